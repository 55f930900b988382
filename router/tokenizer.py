"""Prompt tokenization and streaming detokenization at the router.

Engines receive token ids and return token ids; text exists only here. `TextStream` turns a request's
token ids into text incrementally (tokenizers' `DecodeStream`), holding back bytes of a character that is
still incomplete, so the concatenated deltas equal the decoded whole.

`PromptTokenizer.encode_async` is what the router's event loop calls: a prompt over `max_prompt_bytes` is refused
before any work, and the tokenizing itself runs on a small thread pool (the Rust tokenizer releases the GIL), so a
long prompt never stalls the loop that streams every other request's tokens.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

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


MAX_PROMPT_BYTES = 4 << 20  # a prompt's text (UTF-8) or all its chat messages together


def prompt_bytes(request: Request) -> int:
    """The UTF-8 size of the request's text: its prompt, or all its chat messages; 0 for token ids."""
    if request.prompt is not None:
        return len(request.prompt.encode())
    if request.chat is not None:
        return sum(len(m.content.encode()) + len(m.role.encode()) for m in request.chat)
    return 0


class PromptTokenizer:
    """The served model's tokenizer: prompt text or chat messages in, token ids out."""

    def __init__(self, model_dir: str, max_prompt_bytes: int = MAX_PROMPT_BYTES, threads: int = 2) -> None:
        self._tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model_dir)
        if not self._tokenizer.is_fast:
            raise ValueError(f"{model_dir}: a fast (Rust) tokenizer is required for streaming detokenization")
        self.max_prompt_bytes = max_prompt_bytes
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="pdserve-tokenize")

    async def encode_async(self, request: Request) -> list[int]:
        """`encode` off the event loop, after the byte limit; InvalidArgument for a prompt over it."""
        size = prompt_bytes(request)
        if size > self.max_prompt_bytes:
            raise InvalidArgument(f"the prompt is {size} bytes of text; at most {self.max_prompt_bytes} are accepted")
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.encode, request)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

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
