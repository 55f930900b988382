"""Request validation: pure checks against the served model's limits.

`check_request` runs before tokenization (fields alone), `check_prompt_tokens` and `check_resume` after it
(lengths, ids); `check_client_request_id` checks the key a client names its request with, and
`check_key_free` that a key still running is taken over only by a resume of it. They raise `InvalidArgument` /
`ModelNotFound` / `AlreadyExists` with a message naming the field and the accepted range.
"""

from __future__ import annotations

import math
import re
from collections.abc import Container, Sequence
from dataclasses import dataclass

from common.errors import AlreadyExists, InvalidArgument, ModelNotFound
from router.request import Request

CHAT_ROLES = ("system", "user", "assistant")
MAX_TEMPERATURE = 2.0  # vLLM's own bound
SEED_RANGE = (-(2**63), 2**64 - 1)  # what a torch generator accepts
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(frozen=True, slots=True)
class Limits:
    """What the served model and the operator accept."""

    model_name: str
    max_model_len: int
    max_tokens_limit: int
    vocab_size: int

    def __post_init__(self) -> None:
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not self.max_tokens_limit >= 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")


def check_request(request: Request, limits: Limits) -> None:
    if request.model and request.model != limits.model_name:
        raise ModelNotFound(f"model {request.model!r} is not served here; served models: [{limits.model_name!r}]")
    _check_input(request)
    s = request.sampling
    if not 1 <= s.max_tokens <= limits.max_tokens_limit:
        raise InvalidArgument(
            f"sampling.max_tokens must be between 1 and {limits.max_tokens_limit}, got {s.max_tokens}"
        )
    if not math.isfinite(s.temperature) or not 0 <= s.temperature <= MAX_TEMPERATURE:
        raise InvalidArgument(
            f"sampling.temperature must be between 0 and {MAX_TEMPERATURE:g} (0 means greedy), got {s.temperature}"
        )
    if not math.isfinite(s.top_p) or not 0 < s.top_p <= 1:
        raise InvalidArgument(f"sampling.top_p must be in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise InvalidArgument(f"sampling.top_k must be >= 0 (0 disables it), got {s.top_k}")
    if s.seed is not None and not SEED_RANGE[0] <= s.seed <= SEED_RANGE[1]:
        raise InvalidArgument(f"sampling.seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {s.seed}")
    _check_ids("sampling.stop_token_ids", s.stop_token_ids, limits.vocab_size)
    if len(request.resume_token_ids) >= s.max_tokens:
        raise InvalidArgument(
            f"resume_token_ids holds {len(request.resume_token_ids)} tokens; a resumed request continues only while "
            f"fewer than sampling.max_tokens ({s.max_tokens}) were received"
        )
    _check_ids("resume_token_ids", request.resume_token_ids, limits.vocab_size)


def _check_text(field: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgument(f"{field} is not valid UTF-8: a lone surrogate at character {e.start}") from None


def _check_input(request: Request) -> None:
    if request.prompt is not None:
        if not request.prompt:
            raise InvalidArgument("prompt is empty: send at least one character")
        _check_text("prompt", request.prompt)
    elif request.chat is not None:
        if not request.chat:
            raise InvalidArgument("chat.messages is empty: send at least one message")
        for i, m in enumerate(request.chat):
            if m.role not in CHAT_ROLES:
                raise InvalidArgument(f"chat.messages[{i}].role must be one of {list(CHAT_ROLES)}, got {m.role!r}")
            _check_text(f"chat.messages[{i}].content", m.content)
    elif request.prompt_token_ids is not None:
        if not request.prompt_token_ids:
            raise InvalidArgument("prompt_token_ids.ids is empty: send at least one token id")
    else:
        raise InvalidArgument("the request has no input: set one of prompt, chat or prompt_token_ids")


def check_prompt_tokens(prompt_token_ids: Sequence[int], limits: Limits) -> None:
    n = len(prompt_token_ids)
    if n == 0:
        raise InvalidArgument("prompt is empty after tokenization: send at least one token")
    # At least one token must fit after the prompt.
    if n >= limits.max_model_len:
        raise InvalidArgument(
            f"prompt is {n} tokens long; this model accepts at most {limits.max_model_len - 1} prompt tokens "
            f"(max_model_len {limits.max_model_len} includes at least one generated token)"
        )
    _check_ids("prompt_token_ids.ids", prompt_token_ids, limits.vocab_size)


def _check_ids(field: str, ids: Sequence[int], vocab_size: int) -> None:
    for t in ids:
        if not 0 <= t < vocab_size:
            raise InvalidArgument(f"{field} holds token id {t}; token ids must be in [0, {vocab_size})")


def check_resume(prompt_token_ids: Sequence[int], request: Request, limits: Limits) -> None:
    """A resumed request's prompt plus the tokens already received must leave room for one more token."""
    n, k = len(prompt_token_ids), len(request.resume_token_ids)
    if k and n + k >= limits.max_model_len:
        raise InvalidArgument(
            f"the prompt ({n} tokens) plus resume_token_ids ({k}) reach max_model_len {limits.max_model_len}: "
            "the request had already ended there"
        )


def check_client_request_id(key: str) -> None:
    if key and not CLIENT_REQUEST_ID.fullmatch(key):
        raise InvalidArgument(
            f"request_id must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':' or '-', got {key[:40]!r}"
        )


def check_key_free(key: str, running: Container[str], resuming: bool) -> None:
    """A request under the key of a stream still running is refused unless it resumes that stream (it carries
    `resume_token_ids`: the client lost the first stream); a plain duplicate leaves the running one alone."""
    if key in running and not resuming:
        raise AlreadyExists(
            f"request_id {key!r} is already in flight: wait for it to end, or resend it with resume_token_ids to "
            "resume its stream"
        )
