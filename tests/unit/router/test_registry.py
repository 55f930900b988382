"""The registry's snapshots count KV in the engine's whole blocks, as the engine hands it out."""

from __future__ import annotations

import pytest

from common.errors import Overloaded
from router.kv_placement import ProjectedKv
from router.placement import Placement
from router.predictor.prediction import LengthPrediction
from router.registry import Held, Instance
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
