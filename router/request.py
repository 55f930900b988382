"""The `Request` noun: what the client asked, after the wire format is gone. Immutable."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """Sampling as the client asked for it; None means "the default"."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Request:
    """Exactly one of `prompt`, `chat` and `prompt_token_ids` is set."""

    request_id: str
    sampling: SamplingSpec
    model: str = ""
    prompt: str | None = None
    chat: tuple[ChatMessage, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    arrival: float = 0.0  # time.monotonic() at the router
    deadline: float | None = None  # time.monotonic() after which the request is abandoned
    # A resumed request: the tokens its client already received; generation continues after them, and
    # `sampling.max_tokens` counts them.
    resume_token_ids: tuple[int, ...] = ()
