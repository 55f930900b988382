"""The labelled data file on disk: read it, repair an interrupted tail, append batches durably.

`read_labels` returns a file's records (none when it does not exist) and tolerates an unterminated last line.
`repair_tail` makes the file safe to append to after an interruption: a complete but unterminated last record
gets its newline, a partial one is cut off. `LabelWriter` appends records and flushes to disk after each batch,
so an interrupted run loses at most the batch in flight.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from pdserve_tools.predictor.labels import LabelRecord, from_json, parse_lines


def read_labels(path: str | Path) -> list[LabelRecord]:
    path = Path(path)
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as f:
        return parse_lines(f, str(path))


def repair_tail(path: str | Path) -> str:
    """"none", "terminated" (a newline added) or "cut" (a partial last line removed)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return "none"
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return "none"
    start = data.rfind(b"\n") + 1
    try:
        from_json(data[start:].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        with path.open("r+b") as f:
            f.truncate(start)
        return "cut"
    with path.open("ab") as f:
        f.write(b"\n")
    return "terminated"


class LabelWriter:
    """Appends records to a file, one JSON object per line, flushed and synced per batch."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close/__exit__)

    def write(self, records: Sequence[LabelRecord]) -> None:
        self._file.write("".join(r.to_json() + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> LabelWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
