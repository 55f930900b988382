"""The scheduler half of the KV connector and the spec it reads, driven step by step like vLLM's scheduler."""

from __future__ import annotations

import pytest

from kv_transfer.params import (
    RecvSpec,
    SendSpec,
    block_runs,
    blocks_for,
    from_params,
    layer_key,
    to_params,
)
from kv_transfer.planner import Scheduled, TransferPlanner

BLOCK = 128
SEND = SendSpec("t1", "shm:x", "decode-0", 300, 1e12)
RECV = RecvSpec("t1", "prefill-0", 300, 1e12)


@pytest.mark.parametrize("spec", [SEND, RECV, SendSpec("t2", "tcp:h:1", "d", 1, 5.0, layerwise=False)])
def test_specs_round_trip_through_params(spec):
    assert from_params(to_params(spec)) == spec


def test_params_of_others_are_not_ours():
    assert from_params(None) is None and from_params({"do_remote_prefill": True}) is None


@pytest.mark.parametrize("body, message", [
    ({"role": "send"}, "lacks"),
    ({"role": "both", "transfer_id": "t", "peer_instance": "p", "num_tokens": 3, "deadline": 1.0}, "role"),
    ({"role": "recv", "transfer_id": "t", "peer_instance": "p", "num_tokens": 0, "deadline": 1.0}, "num_tokens"),
])
def test_malformed_params_are_clear_errors(body, message):
    with pytest.raises(ValueError, match=message):
        from_params({"pdserve": body})


def test_blocks_and_keys():
    assert [blocks_for(n, BLOCK) for n in (1, 127, 128, 129, 256)] == [1, 1, 1, 2, 2]
    assert layer_key("t1", 3) == b"t1/3"


@pytest.mark.parametrize("ids, runs", [
    ((), []),
    ((7,), [(7, 8)]),
    ((3, 4, 5, 9, 10, 2), [(3, 6), (9, 11), (2, 3)]),
    ((5, 4, 3), [(5, 6), (4, 5), (3, 4)]),  # descending ids stay separate: the order of the bytes is the order given
])
def test_block_runs_cover_the_ids_in_order(ids, runs):
    assert block_runs(ids) == runs
    assert [b for start, stop in runs for b in range(start, stop)] == list(ids)


def test_a_consumer_loads_once_into_the_blocks_that_hold_its_tokens():
    p = TransferPlanner(BLOCK)
    assert p.matched_tokens("r", RECV, 0) == (300, True)
    p.allocated("r", RECV, [7, 8, 9, 10], 300)
    plan = p.plan([], lambda rid: [])
    assert [(j.req_id, j.block_ids) for j in plan.loads] == [("r", (7, 8, 9))]
    # After the load the scheduler asks again (or after a preemption): now the engine computes locally.
    assert p.matched_tokens("r", RECV, 300) == (0, False)
    assert p.plan([], lambda rid: []).loads == []
    assert p.finished("r") is False
    assert p.tracked == 0


def test_a_consumer_with_too_few_blocks_is_a_bug_not_a_silent_partial_load():
    with pytest.raises(ValueError, match="blocks"):
        TransferPlanner(BLOCK).allocated("r", RECV, [1], 300)


def test_requests_without_our_spec_are_left_alone():
    p = TransferPlanner(BLOCK)
    assert p.matched_tokens("r", None, 0) == (0, False)
    p.allocated("r", None, [1, 2], 0)
    assert p.plan([Scheduled("r", 0, 300)], lambda rid: [1, 2, 3]).saves == []
    assert p.finished("r") is False


def test_a_producer_saves_in_the_step_that_completes_its_prompt_and_holds_blocks_until_sent():
    p = TransferPlanner(BLOCK)
    p.allocated("r", SEND, [4, 5], 0)
    blocks = {"r": [4, 5, 6, 11]}
    assert p.plan([Scheduled("r", 0, 200)], blocks.__getitem__).saves == []  # first chunk of a chunked prefill
    saves = p.plan([Scheduled("r", 200, 100)], blocks.__getitem__).saves
    assert [(j.req_id, j.block_ids) for j in saves] == [("r", (4, 5, 6))]
    assert p.plan([Scheduled("r", 300, 1)], blocks.__getitem__).saves == []  # saved once
    assert p.finished("r") is True
    assert p.tracked == 0


def test_a_producer_aborted_before_its_save_frees_its_blocks_at_once():
    p = TransferPlanner(BLOCK)
    p.allocated("r", SEND, [4], 0)
    assert p.finished("r") is False
    assert p.tracked == 0
