"""The `Request` noun: what the client asked, after the wire format is gone. Immutable."""

from __future__ import annotations

from dataclasses import dataclass

from common.sampling import SamplingSpec


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


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
