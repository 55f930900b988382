"""Prefix-aware placement through real deployments of the tiny model: a conversation's second turn (its first turn's
prompt and answer, then a new user turn) goes to the instance that computed the first turn, whose prefix cache
holds the first turn's blocks, and its greedy tokens equal one plain vLLM engine's.

Disaggregated: two prefill instances placed by `prefix_affinity` and one decode instance, for this module alone,
so the prefix metrics count exactly its two turns. Colocated: the session's two instances, placed by
`prefix_affinity` for the test (by default they take turns when idle).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

from pdserve_client import Client
from router.placement import make_policy
from tests.conftest import start_deployment, stop_deployment
from tests.integration.conftest import BLOCK, greedy, plain_engine

pytestmark = pytest.mark.integration

MAX_TOKENS = 24
FIRST_TURN = 3 * BLOCK + 17  # three whole blocks and part of a fourth


@dataclass(frozen=True)
class Conversation:
    turn1: list[int]
    answer1: list[int]
    turn2: list[int]  # turn1 + answer1 + a new user turn: four whole blocks, the first three turn1's
    answer2: list[int]


@pytest.fixture(scope="module")
def conversation(tiny_model) -> Conversation:
    rng = random.Random(24)
    turn1 = [rng.randrange(100, 49_000) for _ in range(FIRST_TURN)]
    user2 = [rng.randrange(100, 49_000) for _ in range(150)]
    with plain_engine(tiny_model) as llm:
        ((answer1, _),) = greedy(llm, [turn1], ignore_eos=True)
        turn2 = turn1 + answer1 + user2
        ((answer2, _),) = greedy(llm, [turn2], ignore_eos=True)
    return Conversation(turn1, answer1, turn2, answer2)


@pytest.fixture(scope="module")
def two_prefill(tiny_model):
    dep = start_deployment(
        tiny_model,
        {"mode": "disaggregated", "prefill": {"instances": 2}, "decode": {"instances": 1}},
        router={"prefill_policy": "prefix_affinity"},
    )
    yield dep
    stop_deployment(dep)


def counted(dep: Any) -> tuple[float, float, float]:
    """Prefix blocks routed, blocks hit, prefill tokens saved, as the router's metrics count them."""
    registry = dep.router.metrics.registry
    return tuple(registry.get_sample_value(f"pdserve_prefix_{name}_total") or 0.0  # type: ignore[return-value]
                 for name in ("blocks_routed", "blocks_hit", "saved_prefill_tokens"))


def both_turns(dep: Any, conversation: Conversation) -> tuple[Any, Any]:
    with Client(dep.target) as client:
        first = client.complete(conversation.turn1, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                timeout=120)
        second = client.complete(conversation.turn2, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                 timeout=120)
    assert first.token_ids == conversation.answer1
    assert second.token_ids == conversation.answer2
    return first.final, second.final


def test_the_second_turn_prefills_where_the_first_did_and_decodes_exactly(two_prefill, conversation):
    first, second = both_turns(two_prefill, conversation)
    assert first.prefill_instance.startswith("prefill-")
    assert second.prefill_instance == first.prefill_instance
    assert counted(two_prefill) == (3 + 4, 3, 3 * BLOCK)


def test_colocated_the_second_turn_runs_where_the_first_did(deployment, conversation):
    router = deployment.router
    before, policy = counted(deployment), router.policy
    router.policy = make_policy("prefix_affinity")
    try:
        first, second = both_turns(deployment, conversation)
    finally:
        router.policy = policy
    assert second.decode_instance == first.decode_instance == first.prefill_instance
    assert [a - b for a, b in zip(counted(deployment), before, strict=True)] == [3 + 4, 3, 3 * BLOCK]
