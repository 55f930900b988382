"""Greedy output through colocated pdserve equals, token for token, one plain vLLM engine's output.

The reference and its prompts are in this folder's conftest; the disaggregated layouts are checked in
test_disaggregated.py.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import LENGTHS, complete_greedy, prompts

pytestmark = pytest.mark.integration


def test_reference_outputs_are_not_degenerate(reference):
    # A random model that repeated one token would let a dropped or shifted token go unnoticed.
    for ids, _ in reference.single:
        assert len(set(ids)) > len(ids) // 2


@pytest.mark.parametrize("index", range(len(LENGTHS)), ids=[f"prompt{n}" for n in LENGTHS])
def test_greedy_tokens_equal_plain_vllm(deployment, reference, index):
    ids = prompts()[index]
    done = complete_greedy(deployment.target, index)
    expected_ids, expected_reason = reference.single[index]
    assert done.token_ids == expected_ids
    assert done.final.finish_reason == expected_reason
    assert done.final.prompt_tokens == len(ids)
