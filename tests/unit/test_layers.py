"""The tree's layers, read from every import statement (lazy ones inside functions included):

    pdserve (composition root: CLI, config, cluster)
      -> router                      -> common
      -> prefill, decode -> worker   -> common, kv_transfer

The router and the workers never import each other; `common` imports nothing of the project but itself; no
runtime module imports the tools (`pdserve_tools`), and only experimental code imports `kv_transfer.experimental`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ("common", "worker", "prefill", "decode", "kv_transfer", "router", "pdserve")
PROJECT = (*RUNTIME, "pdserve_tools", "pdserve_client")


def imports(package: str) -> list[tuple[str, str]]:
    """(module file, imported top-level-qualified name) for every import in `package`."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(str(path.relative_to(ROOT)), alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((str(path.relative_to(ROOT)), node.module))
    return found


def project_imports(package: str) -> set[tuple[str, str]]:
    return {(f, name) for f, name in imports(package) if name.split(".")[0] in PROJECT}


def offending(package: str, allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    def refused(f: str, name: str) -> bool:
        if name.startswith("kv_transfer.experimental"):
            return not f.startswith("kv_transfer/experimental/")
        return not any(name == layer or name.startswith(layer + ".") for layer in allowed)

    return sorted((f, name) for f, name in project_imports(package) if refused(f, name))


def test_imports_are_read_from_the_tree_and_a_wrong_one_is_caught() -> None:
    # The check below means something only if it sees imports: the router imports common, the workers worker.
    assert ("router/service.py", "common.roles") in project_imports("router")
    assert any(name.startswith("worker.") for _, name in project_imports("decode"))
    # The composition root imports the router; were the router a worker, that import would be refused.
    assert offending("pdserve", ("pdserve", "worker")) != []


@pytest.mark.parametrize(("package", "allowed"), [
    ("common", ("common",)),
    ("kv_transfer", ("kv_transfer", "common")),
    ("worker", ("worker", "common", "kv_transfer")),
    ("prefill", ("prefill", "worker", "common", "kv_transfer")),
    ("decode", ("decode", "worker", "common", "kv_transfer")),
    # The gRPC stubs generated from proto/ ship in the client distribution: the wire contract, not the SDK.
    ("router", ("router", "common", "kv_transfer", "pdserve_client.v1")),
    ("pdserve", (*RUNTIME, "pdserve_client")),
])
def test_each_layer_imports_only_the_layers_below_it(package: str, allowed: tuple[str, ...]) -> None:
    assert offending(package, allowed) == []


def test_only_experimental_code_imports_experimental_code() -> None:
    users = {f for f, name in project_imports("kv_transfer") if name.startswith("kv_transfer.experimental")}
    assert all(f.startswith("kv_transfer/experimental/") for f in users), users
