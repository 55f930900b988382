"""The registry's snapshots count KV in the engine's whole blocks, as the engine hands it out, and carry that
detail only to a policy that needs it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import pytest

from common.errors import Overloaded
from common.roles import Role
from router.placement import InstanceSnapshot, Need, Placement
from router.placement.kv import ProjectedKv
from router.placement.load import LeastOutstanding
from router.placement.policy import ANY_ROLE
from router.predictor.prediction import LengthPrediction
from router.registry import Held, Instance, Registry
from worker.engine import EngineInfo

BLOCK = 16
BLOCKS = 4  # 64 tokens of KV


def decode_instance(held: int) -> Instance:
    """An instance holding `held` one-token requests that generate nothing more: each takes one whole block."""
    instance = Instance("d0", "decode", handle=None, info=EngineInfo(512, BLOCK, BLOCKS), channel=None)
    for i in range(held):
        instance.held[f"r{i}"] = Held(context_tokens=1, max_tokens=0, prediction=LengthPrediction(0, 0))
    return instance


ONE_TOKEN = Placement(prompt_tokens=1, max_tokens=0, prediction=LengthPrediction(0, 0))


def test_requests_fill_the_instance_a_block_each():
    assert ProjectedKv().pick([decode_instance(BLOCKS - 1).snapshot(detailed=True)], ONE_TOKEN) == "d0"
    with pytest.raises(Overloaded):  # 4 tokens of 64, but every block is taken
        ProjectedKv().pick([decode_instance(BLOCKS).snapshot(detailed=True)], ONE_TOKEN)


def test_a_request_as_long_as_the_capacity_fits_only_an_empty_instance():
    whole = Placement(prompt_tokens=BLOCK * BLOCKS, max_tokens=0, prediction=LengthPrediction(0, 0))
    assert ProjectedKv().pick([decode_instance(0).snapshot(detailed=True)], whole) == "d0"
    with pytest.raises(Overloaded):
        ProjectedKv().pick([decode_instance(1).snapshot(detailed=True)], whole)


class Seeing:
    """A policy that takes the first instance and keeps the snapshots it was shown; subclasses say what it needs."""

    name: ClassVar[str] = "seeing"
    places: ClassVar[frozenset[Role]] = ANY_ROLE
    needs: ClassVar[frozenset[Need]] = frozenset({Need.LOAD})

    def __init__(self) -> None:
        self.seen: list[InstanceSnapshot] = []

    def pick(self, snapshots: Sequence[InstanceSnapshot], placement: Placement | None = None) -> str:
        self.seen = list(snapshots)
        return snapshots[0].instance_id


class SeeingKv(Seeing):
    needs = frozenset({Need.LOAD, Need.KV})


class SeeingPrefillQueue(Seeing):
    needs = frozenset({Need.LOAD, Need.PREFILL_QUEUE})


class SeeingPrefixes(Seeing):
    needs = frozenset({Need.PREFIXES})


@pytest.mark.parametrize(("kind", "detailed"), [
    (Seeing, False), (SeeingKv, True), (SeeingPrefillQueue, True), (SeeingPrefixes, True),
])
def test_a_policy_is_shown_the_kv_detail_only_when_it_needs_more_than_load(kind, detailed):
    policy = kind()
    assert Registry([decode_instance(held=2)]).pick(policy, "decode").instance_id == "d0"
    (snapshot,) = policy.seen
    assert (snapshot.outstanding, snapshot.kv_capacity_tokens, len(snapshot.running)) == (
        (0, BLOCK * BLOCKS, 2) if detailed else (0, 0, 0))


def test_a_length_aware_policy_picked_through_the_registry_sees_a_full_instance():
    registry = Registry([decode_instance(BLOCKS)])
    with pytest.raises(Overloaded):
        registry.pick(ProjectedKv(), "decode", ONE_TOKEN)
    assert registry.pick(LeastOutstanding(), "decode", ONE_TOKEN).instance_id == "d0"  # load alone: room enough


def test_placeable_instances_are_healthy_and_not_draining():
    info = EngineInfo(512, BLOCK, BLOCKS)
    a, b, c, p = (Instance(i, role, None, info, None) for i, role in
                  (("a", "decode"), ("b", "decode"), ("c", "decode"), ("p", "prefill")))
    b.healthy, c.draining = False, True
    assert Registry([a, b, c, p]).placeable("decode") == [a]
