"""The router's tokenizer off the event loop: the byte limit comes first, and while a long prompt is tokenized
the loop keeps running other work."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from common.errors import InvalidArgument
from common.sampling import SamplingSpec
from router.request import ChatMessage, Request
from router.tokenizer import PromptTokenizer, prompt_bytes


@pytest.fixture(scope="module")
def model_dir(tiny_model: Path) -> str:
    return str(tiny_model)  # the session's tiny model carries SmolLM2's tokenizer


def request(**fields: object) -> Request:
    return Request("r", SamplingSpec(4), **fields)  # type: ignore[arg-type]


def test_prompt_bytes_count_text_and_chat_but_not_token_ids() -> None:
    assert prompt_bytes(request(prompt="héllo")) == 6
    assert prompt_bytes(request(chat=(ChatMessage("user", "hi"), ChatMessage("assistant", "yo")))) == 17
    assert prompt_bytes(request(prompt_token_ids=(1, 2, 3))) == 0


def test_a_prompt_over_the_byte_limit_is_refused_before_tokenizing(model_dir: str) -> None:
    tokenizer = PromptTokenizer(model_dir, max_prompt_bytes=10)
    with pytest.raises(InvalidArgument, match="the prompt is 11 bytes of text; at most 10 are accepted"):
        asyncio.run(tokenizer.encode_async(request(prompt="x" * 11)))
    assert asyncio.run(tokenizer.encode_async(request(prompt="x" * 10))) == tokenizer.encode(request(prompt="x" * 10))


def test_tokenizing_runs_off_the_event_loop_thread(model_dir: str) -> None:
    tokenizer = PromptTokenizer(model_dir)
    seen: list[str] = []
    encode = tokenizer.encode

    def recording(r: Request) -> list[int]:
        seen.append(threading.current_thread().name)
        return encode(r)

    tokenizer.encode = recording  # type: ignore[method-assign]

    async def main() -> list[int]:
        return await tokenizer.encode_async(request(prompt="Why is the sky blue? " * 2000))

    ids = asyncio.run(main())
    assert len(ids) > 2000 and seen and seen[0].startswith("pdserve-tokenize")
    tokenizer.close()
