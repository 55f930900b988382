"""The gRPC frontend: translates `pdserve.v1` messages to `Request`s and `Delta`s to messages.

Errors of the serving path (`ServeError`) become their gRPC status here, once. A request that protobuf
cannot parse (a string field with invalid UTF-8, say) gets INVALID_ARGUMENT rather than gRPC's generic
INTERNAL: the handlers are registered with a deserializer that reports the failure to the handler.
A client's `request_id` names its stream; a request under the key of a stream still running is refused with
ALREADY_EXISTS (the running one goes on), unless it resumes that stream (it carries `resume_token_ids`): a resume
takes the key over and the older stream ends with ABORTED. Standard health checking and reflection are served beside
the API. With `Security`, the server speaks TLS (mutual with a client CA) and refuses calls without the bearer
token, health checking excepted (`security.py`).
Limits (`RouterConfig`): at most `max_grpc_streams` Generate calls run at once (one more gets RESOURCE_EXHAUSTED
with a retry hint), and gRPC itself bounds the connections (`server_options`): how many, how many calls each runs
at once, how long a handshake, an idle connection and, if asked, any connection may last.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.errors import InvalidArgument, Overloaded, ServeError, trailing_metadata
from common.roles import Role
from common.version import VERSION as __version__
from pdserve_client.v1 import pdserve_pb2 as pb
from router.config import RouterConfig
from router.frontend import LiveStreams, deadline_after, open_stream
from router.request import ChatMessage, Request, SamplingSpec
from router.security import Security, interceptors, server_credentials
from router.service import Delta, Router, new_request_id
from router.validation import check_client_request_id, check_key_free

log = logging.getLogger(__name__)

SERVICE = "pdserve.v1.Generation"
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


@dataclass(frozen=True, slots=True)
class Unparsable:
    """Stands in for a request protobuf could not parse."""

    reason: str


def _tolerant(message_cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except (DecodeError, ValueError) as e:
            return Unparsable(str(e))

    return parse


def request_from_proto(msg: pb.GenerateRequest, request_id: str, deadline: float | None) -> Request:
    s = msg.sampling
    sampling = SamplingSpec(
        max_tokens=s.max_tokens,
        temperature=s.temperature if s.HasField("temperature") else 1.0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        top_k=s.top_k if s.HasField("top_k") else 0,
        seed=s.seed if s.HasField("seed") else None,
        ignore_eos=s.ignore_eos,
        stop_token_ids=tuple(s.stop_token_ids),
    )
    which = msg.WhichOneof("input")
    return Request(
        request_id=request_id,
        sampling=sampling,
        model=msg.model,
        prompt=msg.prompt if which == "prompt" else None,
        chat=tuple(ChatMessage(m.role, m.content) for m in msg.chat.messages) if which == "chat" else None,
        prompt_token_ids=tuple(msg.prompt_token_ids.ids) if which == "prompt_token_ids" else None,
        arrival=time.monotonic(),
        deadline=deadline,
        resume_token_ids=tuple(msg.resume_token_ids),
    )


def delta_to_proto(request_id: str, delta: Delta) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=request_id, token_ids=delta.token_ids, text=delta.text)
    o = delta.outcome
    if o is not None:
        t = o.timings
        msg.final.finish_reason = _FINISH[o.finish_reason]
        msg.final.usage.prompt_tokens = o.prompt_tokens
        msg.final.usage.completion_tokens = o.completion_tokens
        msg.final.prefill_instance = o.prefill_instance
        msg.final.decode_instance = o.decode_instance
        # The wire message and the dataclass have the same fields, by name.
        msg.final.timings.CopyFrom(pb.PhaseTimings(**asdict(t)))
    return msg


class GenerationService:
    def __init__(self, router: Router, info: pb.ServerInfo, max_streams: int) -> None:
        self._router = router
        self._info = info
        self._live = LiveStreams()
        self._running: collections.Counter[str] = collections.Counter()  # client keys of the streams running
        self._max_streams = max_streams
        self._streams = 0  # Generate calls in progress

    @contextlib.contextmanager
    def _stream_slot(self) -> Iterator[None]:
        if self._streams >= self._max_streams:
            raise Overloaded(
                f"the server is running its limit of {self._max_streams} streams at once (router.max_grpc_streams); "
                "retry when one has ended", self._router.admission.retry_after_s
            )
        self._streams += 1
        try:
            yield
        finally:
            self._streams -= 1

    @contextlib.contextmanager
    def _running_under(self, key: str) -> Iterator[None]:
        self._running[key] += 1
        try:
            yield
        finally:
            self._running[key] -= 1
            if not self._running[key]:
                del self._running[key]

    async def generate(self, msg: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        try:
            if isinstance(msg, Unparsable):
                raise InvalidArgument(
                    f"the request is not a valid pdserve.v1.GenerateRequest ({msg.reason}); "
                    "string fields must hold valid UTF-8"
                )
            check_client_request_id(msg.request_id)
            # The engines know the request by a fresh id; the client's key (the same on a resend) names its stream.
            request = request_from_proto(msg, new_request_id(), deadline_after(context.time_remaining()))
            key = msg.request_id or request.request_id
            check_key_free(key, self._running, resuming=bool(msg.resume_token_ids))
            superseded = False
            with self._stream_slot(), self._running_under(key), self._live.claim(key) as claim:
                async with open_stream(self._router, request) as deltas:
                    async for delta in deltas:
                        if claim.superseded:  # leaving the stream stops this request in the engines
                            superseded = True
                            break
                        yield delta_to_proto(key, delta)
            if superseded:
                await context.abort(
                    grpc.StatusCode.ABORTED, f"a newer request with request_id {key!r} took over this stream"
                )
        except ServeError as e:
            await context.abort(grpc.StatusCode[e.status], e.message, trailing_metadata(e))

    async def get_server_info(self, msg: Any, context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        return self._info

    async def list_models(self, msg: Any, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        model = pb.Model(id=self._info.default_model, max_model_len=self._info.max_model_len)
        return pb.ListModelsResponse(models=[model])

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.generate, _tolerant(pb.GenerateRequest), pb.GenerateResponse.SerializeToString
            ),
            "GetServerInfo": grpc.unary_unary_rpc_method_handler(
                self.get_server_info, _tolerant(pb.GetServerInfoRequest), pb.ServerInfo.SerializeToString
            ),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.list_models, _tolerant(pb.ListModelsRequest), pb.ListModelsResponse.SerializeToString
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE, methods)


def server_info(router: Router) -> pb.ServerInfo:
    count = router.registry.count
    colocated = count(Role.COLOCATED)
    return pb.ServerInfo(
        version=__version__,
        mode=router.mode,
        default_model=router.limits.model_name,
        max_model_len=router.limits.max_model_len,
        max_tokens_limit=router.limits.max_tokens_limit,
        prefill_instances=colocated or count(Role.PREFILL),
        decode_instances=colocated or count(Role.DECODE),
    )


def server_options(config: RouterConfig) -> list[tuple[str, int]]:
    """gRPC core's channel arguments for the connection limits of `config` (grpc/impl/channel_arg_names.h)."""
    options = [
        ("grpc.max_allowed_incoming_connections", config.max_grpc_connections),
        ("grpc.max_concurrent_streams", config.max_streams_per_connection),
        ("grpc.server_handshake_timeout_ms", _ms(config.header_timeout_s)),
    ]
    if config.grpc_idle_timeout_s:
        options.append(("grpc.max_connection_idle_ms", _ms(config.grpc_idle_timeout_s)))
    if config.grpc_max_connection_age_s:  # no grace limit (grpc.max_connection_age_grace_ms): running calls finish
        options.append(("grpc.max_connection_age_ms", _ms(config.grpc_max_connection_age_s)))
    return options


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


async def start_grpc(
    router: Router, host: str, port: int, security: Security | None = None, config: RouterConfig | None = None
) -> tuple[grpc.aio.Server, int]:
    """Starts the frontend; returns the server and the port it bound (port 0 picks a free one). Of `config` (the
    defaults when None) it applies the stream and connection limits."""
    security = security or Security()
    limits = config or RouterConfig()
    server = grpc.aio.server(interceptors=interceptors(security), options=server_options(limits))
    service = GenerationService(router, server_info(router), limits.max_grpc_streams)
    server.add_generic_rpc_handlers((service.handler(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    credentials = server_credentials(security.tls)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("gRPC frontend listening on %s:%d", host, bound)
    return server, bound
