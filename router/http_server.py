"""The OpenAI-compatible HTTP frontend (FastAPI on uvicorn), served beside the gRPC one on the router's loop.

    POST /v1/completions, POST /v1/chat/completions   (`stream: true`: Server-Sent Events ending `data: [DONE]`)
    GET  /v1/models, GET /health

A thin shell, as the gRPC frontend is: `openai_wire` translates bodies to `Request`s and deltas to responses;
`Router.generate` does the rest.

Errors: a `ServeError` gets its HTTP status (`_HTTP`) and OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`, with Retry-After on 429; so do bodies that do not parse (400,
not FastAPI's 422) and unknown paths. A stream answers only once its first token is there, so an error before it
(bad input, unknown model, overload, the deadline) still gets its status; an error after it becomes a last
`data: {"error": ...}` event before `[DONE]`.
Deadline: the optional header `X-Request-Timeout` (seconds) is the request's deadline, as gRPC's timeout is.
Cancellation: a client that disconnects, mid-stream or while it waits for a whole response, stops its request
in the engines at once.
Security (`security.py`): with a token, every path but `/health` needs `Authorization: Bearer <token>`; without
it the answer is 401 with OpenAI's error body (code `invalid_api_key`) and `WWW-Authenticate: Bearer`. With TLS,
uvicorn serves HTTPS from the same files as the gRPC frontend, requiring a client certificate when a client CA is
configured.
Connections (`RouterConfig`): a request head must arrive within `header_timeout_s` and its body within
`body_timeout_s` (408); beyond `max_http_connections` open connections, a request gets 503 with OpenAI's error
body and its connection is closed, while the requests of the connections already served go on (`http_guard.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, TypeVar

import fastapi
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from common.errors import Overloaded, ServeError, retry_after_header
from common.version import VERSION as __version__
from router.config import RouterConfig, TlsConfig
from router.frontend import deadline_after, open_stream
from router.http_guard import guarded_protocol
from router.openai_wire import (
    BadField,
    ChatBody,
    CompletionBody,
    Reply,
    chat_request,
    completion_request,
    error_body,
)
from router.request import Request
from router.security import AUTHORIZATION, SCHEME, Security, check_bearer
from router.service import Delta, Router, new_request_id

log = logging.getLogger(__name__)
T = TypeVar("T")

TIMEOUT_HEADER = "X-Request-Timeout"
# A ServeError's gRPC status -> HTTP status, OpenAI error type, error code.
_HTTP: dict[str, tuple[int, str, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error", "invalid_argument"),
    "ALREADY_EXISTS": (409, "invalid_request_error", "already_exists"),
    "NOT_FOUND": (404, "invalid_request_error", "model_not_found"),  # the one NOT_FOUND: an unknown model
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error", "overloaded"),
    "DEADLINE_EXCEEDED": (504, "timeout_error", "deadline_exceeded"),
    "UNAVAILABLE": (503, "server_error", "no_instance"),
    # The one INTERNAL is an engine that failed a request: the server lives on and a retry may succeed.
    "INTERNAL": (503, "server_error", "engine_failure"),
}
_TYPE_TAGS = frozenset({"str", "int", "float", "bool"})  # pydantic's names of union members in an error's loc


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


def translate_error(e: ServeError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body of a serving error."""
    status, kind, code = _HTTP.get(e.status, (500, "server_error", e.status.lower()))
    return status, error_body(e.message, kind, code, getattr(e, "param", None))


def error_response(e: ServeError) -> JSONResponse:
    status, body = translate_error(e)
    headers = {"Retry-After": retry_after_header(e)} if isinstance(e, Overloaded) else None
    return JSONResponse(body, status, headers)


class _Api:
    def __init__(self, router: Router) -> None:
        self._router = router
        self._created = int(time.time())

    async def completions(self, body: CompletionBody, http: fastapi.Request) -> Response:
        request = completion_request(body, new_request_id(), deadline_after(_timeout(http)))
        return await self._respond(http, request, self._reply(False, request, body.stream and body.include_usage),
                                   body.stream)

    async def chat_completions(self, body: ChatBody, http: fastapi.Request) -> Response:
        limit = self._router.limits.max_tokens_limit
        request = chat_request(body, new_request_id(), deadline_after(_timeout(http)), limit)
        return await self._respond(http, request, self._reply(True, request, body.stream and body.include_usage),
                                   body.stream)

    async def models(self) -> dict[str, Any]:
        limits = self._router.limits
        card = {"id": limits.model_name, "object": "model", "created": self._created, "owned_by": "pdserve",
                "max_model_len": limits.max_model_len}
        return {"object": "list", "data": [card]}

    async def health(self) -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    def _reply(self, chat: bool, request: Request, include_usage: bool) -> Reply:
        return Reply(chat, request.request_id, self._router.limits.model_name, int(time.time()), include_usage)

    async def _respond(self, http: fastapi.Request, request: Request, reply: Reply, stream: bool) -> Response:
        if not stream:
            async with open_stream(self._router, request) as deltas:
                return JSONResponse(await _unless_gone(http, _whole(reply, deltas)))
        # The stream outlives this handler: the response's background task closes it when the response ends,
        # completed or cut short by a disconnect.
        owner = contextlib.AsyncExitStack()
        deltas = await owner.enter_async_context(open_stream(self._router, request))
        try:
            first = await _unless_gone(http, anext(deltas))
        except BaseException:
            await owner.aclose()
            raise
        return StreamingResponse(_events(reply, first, deltas), media_type="text/event-stream",
                                 background=BackgroundTask(owner.aclose))


def _timeout(http: fastapi.Request) -> float | None:
    raw = http.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise BadField(f"header {TIMEOUT_HEADER} must be a positive number of seconds, got {raw!r}", TIMEOUT_HEADER)
    return seconds


async def _whole(reply: Reply, deltas: AsyncIterator[Delta]) -> dict[str, Any]:
    parts, outcome = [], None
    async for delta in deltas:
        parts.append(delta.text)
        outcome = delta.outcome or outcome
    assert outcome is not None  # the router's last delta carries it
    return reply.body("".join(parts), outcome)


async def _events(reply: Reply, first: Delta, deltas: AsyncIterator[Delta]) -> AsyncIterator[str]:
    try:
        for chunk in reply.chunks(first, first=True):
            yield _sse(chunk)
        async for delta in deltas:
            for chunk in reply.chunks(delta, first=False):
                yield _sse(chunk)
    except ServeError as e:  # the status went out with the first chunk: the error is the last event
        yield _sse(translate_error(e)[1])
    yield "data: [DONE]\n\n"


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _unless_gone(http: fastapi.Request, work: Awaitable[T]) -> T:
    """`work`'s result, unless the client disconnects first: then `work` is cancelled, which stops the request in
    the engines, and `ClientGone` is raised."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # its clean-up runs before we answer
    if task.cancelled():
        raise ClientGone
    return task.result()


async def _disconnected(http: fastapi.Request) -> None:
    # The body was read already, so the next message the server has for us is the disconnect.
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _invalid_body(http: fastapi.Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return JSONResponse(error_body(f"the request body is not valid JSON: {reason}", "invalid_request_error",
                                       "invalid_argument"), 400)
    path = [str(p) for p in first["loc"][1:] if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS)]
    where = ".".join(path)
    message = f"invalid request body: {where}: {first['msg']}" if where else f"invalid request body: {first['msg']}"
    return JSONResponse(error_body(message, "invalid_request_error", "invalid_argument", path[0] if path else None),
                        400)


async def _serve_error(http: fastapi.Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServeError)
    return error_response(exc)


async def _http_error(http: fastapi.Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    body = error_body(str(exc.detail), "invalid_request_error", None)
    return JSONResponse(body, exc.status_code, exc.headers)


async def _client_gone(http: fastapi.Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"


async def _unexpected(http: fastapi.Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error in the HTTP frontend", exc_info=exc)
    return JSONResponse(error_body("internal server error", "server_error", "internal"), 500)


MAX_BODY_BYTES = 8 << 20  # a request body larger than this gets 413 before any of it is parsed
BODY_TIMEOUT_S = 30.0  # a request body must have arrived whole this long after its head


class _LimitBody:
    """ASGI middleware: a body over `limit` bytes gets 413, by its Content-Length before anything is read, or, for
    a body of no declared length (chunked), as soon as its bytes pass the limit; a body that has not arrived whole
    within `timeout_s` of its request's head gets 408 (a client that trickles its body holds a connection that long
    at most). The body is read here and handed to the app whole, so nothing holds more than `limit` bytes of one
    body."""

    def __init__(self, app: ASGIApp, limit: int, timeout_s: float = BODY_TIMEOUT_S) -> None:
        self._app = app
        self._limit = limit
        self._timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._limit:
            await self._refuse(scope, receive, send, 413, f"the request body is larger than {self._limit} bytes",
                               "body_too_large")
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                body = await self._read(receive)
        except TimeoutError:
            await self._refuse(scope, receive, send, 408, f"the request body did not arrive whole within "
                               f"{self._timeout_s:g} s (router.body_timeout_s)", "body_timeout")
            return
        if body is None:
            await self._refuse(scope, receive, send, 413, f"the request body is larger than {self._limit} bytes",
                               "body_too_large")
            return
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect

        await self._app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it passes the limit."""
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(parts)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._limit:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str, code: str) -> None:
        body = error_body(message, "invalid_request_error", code)
        await JSONResponse(body, status, {"Connection": "close"})(scope, receive, send)


class _RequireToken:
    """ASGI middleware: every HTTP request but `/health` (probes) must carry the bearer token; others get 401."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self._app = app
        self._token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            raw = dict(scope["headers"]).get(AUTHORIZATION.encode())
            refusal = check_bearer(raw.decode("latin-1") if raw is not None else None, self._token)
            if refusal is not None:
                body = error_body(refusal, "invalid_request_error", "invalid_api_key")
                headers = {"WWW-Authenticate": f'{SCHEME} realm="pdserve"'}
                await JSONResponse(body, 401, headers)(scope, receive, send)
                return
        await self._app(scope, receive, send)


def build_app(
    router: Router,
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    body_timeout_s: float = BODY_TIMEOUT_S,
) -> fastapi.FastAPI:
    app = fastapi.FastAPI(title="pdserve", version=__version__, docs_url=None, redoc_url=None)
    if token is not None:
        app.add_middleware(_RequireToken, token=token)
    # Added last, so it runs first: before the token check.
    app.add_middleware(_LimitBody, limit=max_body_bytes, timeout_s=body_timeout_s)
    api = _Api(router)
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
    return app


class _Server(uvicorn.Server):
    """uvicorn that leaves signals alone: the process that embeds it decides when it stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """A running HTTP frontend; `stop` ends it."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None]) -> None:
        self._server = server
        self._task = task

    async def stop(self, grace: float = 5.0) -> None:
        """Stops accepting connections, lets responses in progress run `grace` seconds more, then cancels them."""
        self._server.config.timeout_graceful_shutdown = math.ceil(grace)
        self._server.should_exit = True
        await self._task


def _tls_options(tls: TlsConfig) -> dict[str, Any]:
    """uvicorn's TLS settings: HTTPS from the server's files; with a client CA, client certificates required."""
    if not tls.enabled:
        return {}
    options: dict[str, Any] = {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
    if tls.client_ca_file is not None:
        options.update(ssl_ca_certs=tls.client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


# How long an idle client connection stays open. Longer than clients keep idle pooled connections (aiohttp 15 s,
# httpx 5 s), so the client closes first: with uvicorn's 5 s a pooled connection could close under a client that
# had just begun writing a request on it, which the client sees as a failed request.
KEEP_ALIVE_S = 75


async def start_http(
    router: Router, host: str, port: int, security: Security | None = None, config: RouterConfig | None = None
) -> tuple[HttpServer, int]:
    """Starts the frontend on the running loop; returns the server and the port it bound (0 picks a free one).
    Of `config` (the defaults when None) it applies the body, header and connection limits."""
    security = security or Security()
    limits = config or RouterConfig()
    # Bound and listening before uvicorn starts, so the port is known and early clients wait in the backlog.
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    app = build_app(router, security.token, limits.max_body_bytes, limits.body_timeout_s)
    # The connection cap is the protocol's (an OpenAI-shaped 503), not uvicorn's `limit_concurrency` (plain text).
    served = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, ws="none",
                            http=guarded_protocol(limits.header_timeout_s, limits.max_http_connections),
                            timeout_keep_alive=KEEP_ALIVE_S, **_tls_options(security.tls))
    server = _Server(served)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="pdserve-http")
    task.add_done_callback(_report_exit)
    bound = sock.getsockname()[1]
    log.info("HTTP frontend (OpenAI-compatible) listening on %s:%d", host, bound)
    return HttpServer(server, task), bound


def _report_exit(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the HTTP frontend stopped", exc_info=task.exception())
