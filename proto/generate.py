"""Generates the Python stubs of the wire contract into the client distribution.

    python proto/generate.py [OUT_DIR]

The stubs live in `pdserve-client` (package `pdserve_client.v1`) so that the client needs nothing but grpcio
and protobuf; the server imports them from there. protoc writes absolute imports that follow the .proto path
(`from pdserve.v1 import ...`); they are rewritten to relative imports so the stubs work inside any package.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "client" / "pdserve_client" / "v1"
PROTO_FILES = ("pdserve/v1/pdserve.proto",)


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # dev dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"]
        if protoc.main([*args, *PROTO_FILES]) != 0:
            raise SystemExit("protoc failed")
        for path in sorted((Path(tmp) / "pdserve" / "v1").iterdir()):
            text = re.sub(r"^from pdserve\.v1 import ", "from . import ", path.read_text(), flags=re.M)
            (out_dir / path.name).write_text(text)
    (out_dir / "__init__.py").write_text('"""Generated from proto/pdserve/v1/*.proto by proto/generate.py."""\n')


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
