"""The request channel's wire format: how a request's own traffic travels between the router and a worker.

Ray carries the workers' lifecycle (start, stats, abort, release, shutdown). A request's prompt and its tokens
travel on a plain TCP connection from the router straight to the worker's actor process, where a small asyncio
server runs beside the engine. A Ray actor call costs about 2.5 ms on a 2-core host and a Ray stream about 1 ms per
item, a gRPC stream on loopback about 1.2 ms to its first item and 0.5 ms per item, this channel a fraction of that
(`pdserve bench overhead` measures the whole path).

Wire: every frame is a 4-byte big-endian length and that many bytes of JSON (never pickle). A new connection opens
with a challenge: the worker sends `{"nonce": hex}` (fresh random bytes) and the router answers
`{"proof": hex(HMAC-SHA256(secret, "pdserve channel|" + nonce))}`, so the cluster secret itself never travels.
Calls follow on the authenticated connection: a call opens with `{"method": "Generate" | "Prefill", "call"}`; the
worker answers with `{"chunk": EngineChunk}`... (`Generate`, the last one carrying a finish reason), one
`{"result": PrefillResult}` (`Prefill`), or `{"error": {"code", "message"}}`. A `Generate` whose engine ended without
a finish reason ends with `{"end": true}`. A connection carries one call at a time; once a call has ended the
router may send the next call's opening frame on the same connection (it keeps up to `MAX_IDLE` idle connections
per worker, each authenticated once), so a call usually costs no connect and no challenge.

Contract:
- A worker serves a connection only once its proof checks out (`UNAUTHENTICATED` otherwise, and the connection
  closes). Before that it reads one frame of at most `MAX_PROOF_FRAME` bytes, which must come within
  `HELLO_TIMEOUT_S`; after it, frames of at most `MAX_FRAME` bytes. A worker keeps at most `MAX_CONNECTIONS` open
  and closes any beyond that at once.
- An error frame says what a client may see: the details of an engine's failure stay in the worker's log.
- The caller closing the connection during a call (the router does when its client goes away or a deadline
  passes) cancels the worker's handler, which stops the request in the engine. A connection whose call did not end
  cleanly is never used again.
- The router sees `WorkerGone` when the worker cannot be reached or its connection breaks before the call ended (its
  process died), and `EngineFailure` for a call the worker ended with an error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import struct
from typing import Any

from common.sampling import SamplingSpec

LENGTH = struct.Struct("!I")
MAX_FRAME = 64 << 20
MAX_PROOF_FRAME = 4 << 10  # the only frame a worker reads from a connection that has not proved the secret yet
MAX_CONNECTIONS = 256  # open connections per worker; more are closed on arrival
NONCE_BYTES = 32
HELLO_TIMEOUT_S = 10.0  # a new connection that does not prove the secret within this long is dropped
UNAUTHENTICATED, INTERNAL, INVALID_ARGUMENT = "UNAUTHENTICATED", "INTERNAL", "INVALID_ARGUMENT"


class ChannelError(Exception):
    """A frame that breaks the protocol."""


def frame(message: Any) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return LENGTH.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader, head: bytes = b"", limit: int = MAX_FRAME) -> Any:
    """The next frame; `head`: its first bytes, already read. A frame over `limit` bytes is refused unread."""
    (n,) = LENGTH.unpack(head + await reader.readexactly(LENGTH.size - len(head)))
    if n > limit:
        raise ChannelError(f"a frame of {n} bytes; the limit is {limit}")
    return json.loads(await reader.readexactly(n))


def proof(secret: str, nonce: bytes) -> str:
    """The answer to a worker's challenge: proves the secret without sending it."""
    return hmac.new(secret.encode(), b"pdserve channel|" + nonce, hashlib.sha256).hexdigest()


def fields(obj: Any) -> dict[str, Any]:
    """A dataclass's fields by name, values as they are: unlike `dataclasses.asdict`, no deep copy of every
    message on the way to JSON (which writes tuples as lists; `sampling_from` turns them back)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def call_message(request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec,
          kv_params: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": request_id, "prompt": prompt_token_ids, "sampling": fields(sampling), "kv": kv_params}


def sampling_from(fields: dict[str, Any]) -> SamplingSpec:
    return SamplingSpec(**{**fields, "stop_token_ids": tuple(fields["stop_token_ids"])})
