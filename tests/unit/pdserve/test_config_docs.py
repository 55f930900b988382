"""docs/configuration.md is generated from the config dataclasses; the committed page must be current."""

from pathlib import Path

from pdserve.config import ServeConfig
from pdserve.config_docs import render

PAGE = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def test_the_committed_page_is_what_pdserve_config_docs_writes():
    assert PAGE.read_text() == render(), "docs/configuration.md is stale: run `pdserve config docs`"


def test_every_key_and_its_default_is_on_the_page():
    text = render()
    assert "| `workers.colocated.instances` | `int` | `2` |" in text  # a nested section's own default
    assert f"| `engine.max_model_len` | `int` | `{ServeConfig().engine.max_model_len}` |" in text
    assert "prompt plus output tokens of one request" in text  # the comment on the field's line
