"""Conversions between the client's plain types and the generated protobuf messages."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

from pdserve_client.errors import InvalidArgument
from pdserve_client.types import Chunk, Final, PhaseTimings, ServerInfo
from pdserve_client.v1 import pdserve_pb2 as pb

GENERATE_METHOD = "/pdserve.v1.Generation/Generate"

_TIMING_FIELDS = tuple(f.name for f in fields(PhaseTimings))

_FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
}


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of one request; None leaves the server's default."""

    max_tokens: int = 64
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: Sequence[int] = ()


Prompt = str | Sequence[dict[str, str]] | Sequence[int]

_U32, _U64 = 2**32 - 1, 2**64 - 1


def _whole(field: str, value: object, low: int, high: int) -> int:
    """`value` as an int in [low, high], else `InvalidArgument` naming the field and the range."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(f"{field} must be a whole number in [{low}, {high}], got {value!r}")
    return value


def _finite(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{field} must be a finite number, got {value!r}")
    return float(value)


def check_sampling(sampling: Sampling) -> None:
    """What the wire can carry, checked before anything is sent (the server checks the ranges it accepts)."""
    _whole("max_tokens", sampling.max_tokens, 0, _U32)  # the server says which it accepts (1 ..)
    if sampling.temperature is not None:
        _finite("temperature", sampling.temperature)
    if sampling.top_p is not None:
        _finite("top_p", sampling.top_p)
    if sampling.top_k is not None:
        _whole("top_k", sampling.top_k, 0, _U32)
    if sampling.seed is not None:
        _whole("seed", sampling.seed, 0, _U64)
    for i, t in enumerate(sampling.stop_token_ids):
        _whole(f"stop_token_ids[{i}]", t, 0, _U32)


def build_request(prompt: Prompt, sampling: Sampling, model: str = "", request_id: str = "") -> pb.GenerateRequest:
    """A str is raw text, a list of {"role", "content"} dicts is a chat, a list of ints is token ids."""
    request = pb.GenerateRequest(model=model, request_id=request_id)
    if isinstance(prompt, str):
        request.prompt = prompt
    elif all(isinstance(m, dict) for m in prompt) and prompt:
        request.chat.messages.extend(
            pb.ChatMessage(role=m["role"], content=m["content"])  # type: ignore[index]
            for m in prompt
        )
    else:
        request.prompt_token_ids.ids.extend(_whole(f"prompt[{i}]", t, 0, _U32) for i, t in enumerate(prompt))
    check_sampling(sampling)
    s = request.sampling
    s.max_tokens = sampling.max_tokens
    if sampling.temperature is not None:
        s.temperature = sampling.temperature
    if sampling.top_p is not None:
        s.top_p = sampling.top_p
    if sampling.top_k is not None:
        s.top_k = sampling.top_k
    if sampling.seed is not None:
        s.seed = sampling.seed
    s.ignore_eos = sampling.ignore_eos
    s.stop_token_ids.extend(sampling.stop_token_ids)
    return request


def chunk_from_proto(msg: pb.GenerateResponse) -> Chunk:
    final = None
    if msg.HasField("final"):
        f = msg.final
        t = f.timings
        final = Final(
            finish_reason=_FINISH.get(f.finish_reason, "unspecified"),
            prompt_tokens=f.usage.prompt_tokens,
            completion_tokens=f.usage.completion_tokens,
            # The dataclass mirrors the wire message field for field.
            timings=PhaseTimings(**{name: getattr(t, name) for name in _TIMING_FIELDS}),
            prefill_instance=f.prefill_instance,
            decode_instance=f.decode_instance,
        )
    return Chunk(request_id=msg.request_id, token_ids=list(msg.token_ids), text=msg.text, final=final)


def server_info_from_proto(msg: pb.ServerInfo) -> ServerInfo:
    return ServerInfo(
        version=msg.version,
        mode=msg.mode,
        default_model=msg.default_model,
        max_model_len=msg.max_model_len,
        max_tokens_limit=msg.max_tokens_limit,
        prefill_instances=msg.prefill_instances,
        decode_instances=msg.decode_instances,
    )


def resumed(request: pb.GenerateRequest, received: Sequence[int]) -> pb.GenerateRequest:
    """The request resent after its stream broke: the same key, plus the token ids already received."""
    again = pb.GenerateRequest()
    again.CopyFrom(request)
    del again.resume_token_ids[:]
    again.resume_token_ids.extend(received)
    return again
