"""The request channel's wire format: how a request's own traffic travels between the router and a worker.

Ray carries the workers' lifecycle (start, stats, abort, release, shutdown). A request's prompt and its tokens
travel on a plain TCP connection from the router straight to the worker's actor process, where a small asyncio
server runs beside the engine. A Ray actor call costs about 2.5 ms on a 2-core host and a Ray stream about 1 ms per
item, a gRPC stream on loopback about 1.2 ms to its first item and 0.5 ms per item, this channel a fraction of that
(`pdserve bench overhead` measures the whole path).

Wire: every frame is a 4-byte big-endian length and that many bytes of JSON (never pickle). A call opens with
`{"secret", "method": "Generate" | "Prefill", "call"}`; the worker answers with `{"chunk": EngineChunk}`...
(`Generate`, the last one carrying a finish reason), one `{"result": PrefillResult}` (`Prefill`), or
`{"error": {"code", "message"}}`. A `Generate` whose engine ended without a finish reason ends with
`{"end": true}`. A connection carries one call at a time; once a call has ended the router may send the next
call's opening frame on the same connection (it keeps up to `MAX_IDLE` idle connections per worker), so a call
usually costs no connect.

Contract:
- A worker accepts calls only with the cluster secret (`UNAUTHENTICATED` otherwise, and the connection closes) and
  frames of at most `MAX_FRAME` bytes; a new connection must open its first call within `HELLO_TIMEOUT_S`.
- The caller closing the connection during a call (the router does when its client goes away or a deadline
  passes) cancels the worker's handler, which stops the request in the engine. A connection whose call did not end
  cleanly is never used again.
- The router sees `WorkerGone` when the worker cannot be reached or its connection breaks before the call ended (its
  process died), and `EngineFailure` for a call the worker ended with an error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct
from typing import Any

from common.sampling import SamplingSpec

LENGTH = struct.Struct("!I")
MAX_FRAME = 64 << 20
HELLO_TIMEOUT_S = 10.0  # a new connection that says nothing for this long is dropped
UNAUTHENTICATED, INTERNAL, INVALID_ARGUMENT = "UNAUTHENTICATED", "INTERNAL", "INVALID_ARGUMENT"


class ChannelError(Exception):
    """A frame that breaks the protocol."""


def frame(message: Any) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return LENGTH.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader, head: bytes = b"") -> Any:
    """The next frame; `head`: its first bytes, already read."""
    (n,) = LENGTH.unpack(head + await reader.readexactly(LENGTH.size - len(head)))
    if n > MAX_FRAME:
        raise ChannelError(f"a frame of {n} bytes; the limit is {MAX_FRAME}")
    return json.loads(await reader.readexactly(n))


def fields(obj: Any) -> dict[str, Any]:
    """A dataclass's fields by name, values as they are: unlike `dataclasses.asdict`, no deep copy of every
    message on the way to JSON (which writes tuples as lists; `sampling_from` turns them back)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def call_message(request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec,
          kv_params: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": request_id, "prompt": prompt_token_ids, "sampling": fields(sampling), "kv": kv_params}


def sampling_from(fields: dict[str, Any]) -> SamplingSpec:
    return SamplingSpec(**{**fields, "stop_token_ids": tuple(fields["stop_token_ids"])})
