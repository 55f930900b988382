"""A client for any OpenAI-compatible completions server that records what `serve_metrics` needs of each request.

Contract. `OpenAIDriver(base_url, model)` is an async context manager holding one aiohttp session (one
connection pool, no limit on connections, so hundreds of streams run at once). `send(request, timeout)` posts
one streaming `POST {base_url}/completions` and returns a `RequestTrace`: the send time, the arrival time of
every Server-Sent Event that carried output tokens and how many it carried, and `request.prompt_tokens`. All
times are `time.monotonic()`. It never raises for a failed request: a refused connection, an HTTP error status,
an error event in the stream, a broken or unfinished stream (no `data: [DONE]`) and the timeout each become a
trace with `error` set to a short reason (the chunks that did arrive are kept).

The body holds only fields that both plain vLLM and pdserve's HTTP frontend honour: `model`, `prompt` (text or
token ids), `max_tokens`, `temperature: 0`, `ignore_eos: true`, `stream: true`,
`stream_options: {"include_usage": true}`, plus `return_token_ids: true`, vLLM's extension that puts each
chunk's generated token ids in `choices[0].token_ids`; servers without it (pdserve ignores unknown fields) leave
the field out.

Tokens per chunk: `len(token_ids)` when the chunk has the field (a chunk with none is not an output chunk), else
one per chunk, which is what a server streaming one event per engine step sends without speculative decoding.
The final `usage.completion_tokens`, when the server sends it, is the request's token count: a surplus (a server
that folds several tokens into one event, as pdserve does while its detokenizer holds back an incomplete
character) is added to the last chunk, and a shortfall (events that carried no token) drops chunks before the
last, so the last chunk's arrival stays the end of the request. With `token_ids` present the two agree and
nothing changes.
"""

from __future__ import annotations

import asyncio
import json
import time
from types import TracebackType
from typing import Any

import aiohttp

from pdserve_tools.bench.serve_metrics import RequestTrace
from pdserve_tools.bench.workload import BenchRequest

_DONE = b"[DONE]"
_ERROR_BODY_CHARS = 300


class _Failed(Exception):
    """A request that failed; the message is the trace's error."""


class _Stream:
    """What one response's events said so far."""

    __slots__ = ("done", "times", "tokens", "usage")

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.usage: int | None = None
        self.done = False

    def event(self, data: bytes, at: float) -> None:
        if data == _DONE:
            self.done = True
            return
        try:
            event = json.loads(data)
        except ValueError:
            raise _Failed(f"undecodable stream event: {data[:80]!r}") from None
        if not isinstance(event, dict):
            raise _Failed(f"unexpected stream event: {data[:80]!r}")
        if event.get("error") is not None:
            raise _Failed(f"error event: {_message(event)}")
        usage = event.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage = usage["completion_tokens"]
        for choice in event.get("choices") or ():
            ids = choice.get("token_ids")
            count = len(ids) if isinstance(ids, list) else 1
            if count:
                self.times.append(at)
                self.tokens.append(count)

    def reconciled(self) -> tuple[list[float], list[int]]:
        """Times and token counts, matched to the server's own completion token count where it sent one."""
        times, tokens = self.times, self.tokens
        if self.usage is None or not tokens or self.usage < 1:
            return times, tokens
        surplus = self.usage - sum(tokens)
        if surplus >= 0:
            return times, [*tokens[:-1], tokens[-1] + surplus]
        last = min(tokens[-1], self.usage)
        rest = self.usage - last
        kept_times: list[float] = []
        kept_tokens: list[int] = []
        for at, count in zip(times[:-1], tokens[:-1], strict=True):
            if rest <= 0:
                break
            kept_times.append(at)
            kept_tokens.append(min(count, rest))
            rest -= kept_tokens[-1]
        return [*kept_times, times[-1]], [*kept_tokens, last]


def _message(event: dict[str, Any]) -> str:
    error = event.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)[:_ERROR_BODY_CHARS]
    return str(error or event.get("message") or event)[:_ERROR_BODY_CHARS]


class OpenAIDriver:
    """Async context manager; one shared HTTP client."""

    def __init__(self, base_url: str, model: str) -> None:
        self._url = base_url.rstrip("/") + "/completions"
        self._model = model
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpenAIDriver:
        # limit=0: no cap on connections; each stream holds one for its whole life.
        connector = aiohttp.TCPConnector(limit=0)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                              auto_decompress=False)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def body(self, request: BenchRequest) -> dict[str, Any]:
        prompt = request.prompt if isinstance(request.prompt, str) else list(request.prompt)
        return {"model": self._model, "prompt": prompt, "max_tokens": request.max_tokens, "temperature": 0.0,
                "ignore_eos": request.ignore_eos, "stream": True, "stream_options": {"include_usage": True},
                "return_token_ids": True}

    async def send(self, request: BenchRequest, timeout: float) -> RequestTrace:
        if self._session is None:
            raise RuntimeError("use OpenAIDriver as `async with OpenAIDriver(...) as driver`")
        payload = json.dumps(self.body(request), separators=(",", ":")).encode()
        stream = _Stream()
        sent = time.monotonic()
        error: str | None = None
        try:
            async with asyncio.timeout(timeout):
                await self._stream(payload, stream)
        except _Failed as e:
            error = str(e)
        except TimeoutError:
            error = f"timed out after {timeout:g} s"
        except aiohttp.ClientConnectorError as e:
            error = f"cannot connect: {e.os_error or e}"
        except aiohttp.ClientPayloadError as e:
            error = f"stream broken: {e}"
        except (aiohttp.ClientError, OSError) as e:
            error = f"{type(e).__name__}: {e}"
        if error is None and not stream.done:
            error = "the stream ended before data: [DONE]"
        if error is None and not stream.tokens:
            error = "the stream carried no output token"
        times, tokens = (stream.times, stream.tokens) if error else stream.reconciled()
        return RequestTrace(sent, tuple(times), tuple(tokens), request.prompt_tokens, error=error)

    async def _stream(self, payload: bytes, stream: _Stream) -> None:
        assert self._session is not None
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        async with self._session.post(self._url, data=payload, headers=headers) as response:
            if response.status != 200:
                text = (await response.read()).decode(errors="replace")
                try:
                    reason = _message(json.loads(text))
                except (ValueError, AttributeError):
                    reason = text[:_ERROR_BODY_CHARS]
                raise _Failed(f"HTTP {response.status}: {reason}")
            pending = b""
            async for data in response.content.iter_any():
                at = time.monotonic()
                pending += data
                # Events end with a blank line; a read may hold several events or part of one.
                *events, pending = pending.replace(b"\r\n", b"\n").split(b"\n\n")
                for raw in events:
                    for line in raw.split(b"\n"):
                        if line.startswith(b"data:"):
                            stream.event(line[5:].strip(), at)
                if stream.done:
                    return
