"""OpenAI's wire format: request bodies in, `Request`s out; `Delta`s in, response bodies and stream chunks out.

The HTTP frontend's counterpart of the gRPC stubs. Bodies are pydantic models (the JSON edge); what they
hold becomes a `Request` exactly as a `GenerateRequest` would, so validation, its messages and its errors are
the router's own. Fields pdserve cannot honour (n > 1, stop strings, logprobs, penalties, tools, ...) are
refused with INVALID_ARGUMENT naming the field, never silently dropped; unknown fields are ignored, as
OpenAI-compatible servers do. vLLM's extensions `top_k`, `ignore_eos` and `stop_token_ids` are accepted.
Without `max_tokens`, a completion gets OpenAI's default of 16 tokens and a chat completion up to the router's
`max_tokens_limit` (the engine stops earlier at the model's maximum length).

Each response carries `usage` (prompt and completion tokens) and, as an extension field `pdserve`, the
instances that served the request and its per-phase timings.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from common.errors import InvalidArgument
from router.request import ChatMessage, Request, SamplingSpec
from router.service import Delta, Outcome

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
# Refused unless absent or neutral (null, false, 0, empty, or the value named here).
_UNSUPPORTED = ("n", "best_of", "echo", "suffix", "logprobs", "top_logprobs", "stop", "presence_penalty",
                "frequency_penalty", "repetition_penalty", "logit_bias", "tools", "functions", "response_format")
_NEUTRAL: dict[str, Any] = {"n": 1, "best_of": 1, "response_format": {"type": "text"}}


class BadField(InvalidArgument):
    """A body the HTTP edge itself refuses; `param` names the offending field as the client spelled it."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Body(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="allow")

    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionBody(_Body):
    prompt: str | list[int] | list[str] | list[list[int]]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class MessageBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None


class ChatBody(_Body):
    messages: list[MessageBody]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins when both are set


def error_body(message: str, kind: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def completion_request(body: CompletionBody, request_id: str, deadline: float | None) -> Request:
    _refuse_unsupported(body)
    prompt, ids = _prompt(body.prompt)
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
    return Request(request_id=request_id, sampling=_sampling(body, max_tokens), model=body.model, prompt=prompt,
                   prompt_token_ids=ids, arrival=time.monotonic(), deadline=deadline)


def chat_request(body: ChatBody, request_id: str, deadline: float | None, max_tokens_limit: int) -> Request:
    _refuse_unsupported(body)
    chat = tuple(ChatMessage(m.role, _text(m, i)) for i, m in enumerate(body.messages))
    max_tokens = next((n for n in (body.max_completion_tokens, body.max_tokens) if n is not None), max_tokens_limit)
    return Request(request_id=request_id, sampling=_sampling(body, max_tokens), model=body.model, chat=chat,
                   arrival=time.monotonic(), deadline=deadline)


def _refuse_unsupported(body: _Body) -> None:
    for name, value in (body.model_extra or {}).items():
        if name in _UNSUPPORTED and value not in (None, False, 0, "", [], {}, _NEUTRAL.get(name)):
            raise BadField(f"{name} is not supported by this server; leave it out", name)


def _prompt(prompt: str | list[int] | list[str] | list[list[int]]) -> tuple[str | None, tuple[int, ...] | None]:
    """(text, token ids): exactly one is set. A batch of one prompt is that prompt."""
    if isinstance(prompt, str):
        return prompt, None
    if prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise BadField(f"prompt holds {len(prompt)} prompts; send one prompt per request", "prompt")
        return _prompt(prompt[0])  # type: ignore[arg-type]
    return None, tuple(prompt)  # type: ignore[arg-type]


def _text(message: MessageBody, index: int) -> str:
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise BadField(f"messages[{index}].content[{j}] is of type {part.type!r}; only text parts are "
                           "supported", "messages")
    return "".join(part.text or "" for part in content)


def _sampling(body: _Body, max_tokens: int) -> SamplingSpec:
    d = SamplingSpec(max_tokens)
    top_k = body.top_k if body.top_k != -1 else 0  # vLLM's clients spell "no top-k" -1
    return SamplingSpec(
        max_tokens=max_tokens,
        temperature=d.temperature if body.temperature is None else body.temperature,
        top_p=d.top_p if body.top_p is None else body.top_p,
        top_k=d.top_k if top_k is None else top_k,
        seed=body.seed,
        ignore_eos=body.ignore_eos,
        stop_token_ids=tuple(body.stop_token_ids or ()),
    )


@dataclass(frozen=True, slots=True)
class Reply:
    """The response to one request in OpenAI's shape: whole (`body`) or as stream chunks (`chunks`)."""

    chat: bool
    request_id: str
    model: str
    created: int  # Unix seconds
    include_usage: bool = False  # streams only: a last chunk with usage and no choices

    def body(self, text: str, outcome: Outcome) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": outcome.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": outcome.finish_reason}
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": usage(outcome), "pdserve": _extension(outcome)}

    def chunks(self, delta: Delta, first: bool) -> list[dict[str, Any]]:
        """The chunks one delta becomes: its text (the finish reason on the last), then usage if asked for."""
        o = delta.outcome
        if not delta.text and not first and o is None:
            return []  # the detokenizer holds back an incomplete character
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "delta": {"role": "assistant", "content": delta.text} if first
                                      else {"content": delta.text}}
        else:
            choice = {"index": 0, "text": delta.text}
        choice |= {"logprobs": None, "finish_reason": None if o is None else o.finish_reason}
        chunk = self._chunk([choice])
        if o is None:
            return [chunk]
        chunk["pdserve"] = _extension(o)
        return [chunk, self._chunk([]) | {"usage": usage(o)}] if self.include_usage else [chunk]

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": choices}
        if self.include_usage:
            chunk["usage"] = None  # every chunk but the last, as OpenAI sends them
        return chunk

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": ("chatcmpl-" if self.chat else "cmpl-") + self.request_id, "object": obj,
                "created": self.created, "model": self.model}


def usage(o: Outcome) -> dict[str, int]:
    return {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
            "total_tokens": o.prompt_tokens + o.completion_tokens}


def _extension(o: Outcome) -> dict[str, Any]:
    return {"prefill_instance": o.prefill_instance, "decode_instance": o.decode_instance,
            "timings": dataclasses.asdict(o.timings)}
