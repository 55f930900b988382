"""Prompt tokenization and streaming detokenization at the router.

Engines receive token ids and return token ids; text exists only here. `TextStream` turns a request's
token ids into text incrementally (tokenizers' `DecodeStream`), holding back bytes of a character that is
still incomplete, so the concatenated deltas equal the decoded whole.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from common.errors import InvalidArgument
from router.request import Request


class TextStream:
    """Incremental detokenizer of one request's generated tokens."""

    __slots__ = ("_backend", "_stream")

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_ids: list[int]) -> str:
        parts = []
        for t in token_ids:
            piece = self._stream.step(self._backend, t)
            if piece:
                parts.append(piece)
        return "".join(parts)


class PromptTokenizer:
    """The served model's tokenizer: prompt text or chat messages in, token ids out."""

    def __init__(self, model_dir: str) -> None:
        self._tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model_dir)
        if not self._tokenizer.is_fast:
            raise ValueError(f"{model_dir}: a fast (Rust) tokenizer is required for streaming detokenization")

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    def encode(self, request: Request) -> list[int]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        if request.chat is not None:
            messages = [{"role": m.role, "content": m.content} for m in request.chat]
            if self._tokenizer.chat_template is None:
                raise InvalidArgument("chat input is not supported: the served model has no chat template")
            text = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(self._tokenizer.encode(text, add_special_tokens=False))
        assert request.prompt is not None
        return list(self._tokenizer.encode(request.prompt, add_special_tokens=True))

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=True))

    def text_stream(self) -> TextStream:
        return TextStream(self._tokenizer)
