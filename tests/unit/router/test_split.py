"""Split or whole (`router.placement.split`): the choice and the pace it learns."""

from __future__ import annotations

import pytest

from router.placement.split import PrefillPace, Resident, SplitView, projected_tpot, runs_whole


def _view(prefill_queue: int, decode_queue: int = 0, *residents: Resident, tokens: int = 300) -> SplitView:
    return SplitView(tokens, prefill_queue, decode_queue, residents)


def test_a_leg_runs_whole_only_when_its_decode_instance_has_fewer_prompt_tokens_queued():
    assert runs_whole(_view(prefill_queue=300), None, None)
    assert not runs_whole(_view(prefill_queue=0), None, None)
    assert not runs_whole(_view(prefill_queue=300, decode_queue=300), None, None)  # a tie splits
    assert runs_whole(_view(prefill_queue=600, decode_queue=300), None, None)


def test_the_projected_tpot_keeps_the_residents_pace_and_spreads_the_hold_up_over_its_tokens():
    # 11 tokens in 1 s since the first: 0.1 s a token; 90 more at that pace, then a hold-up of 2 s, over 100 tokens
    resident = Resident(generated=11, expected=101, elapsed_s=1.0)
    assert projected_tpot(resident, 0.0) == pytest.approx(0.1)
    assert projected_tpot(resident, 2.0) == pytest.approx(0.12)
    # before its second token only the hold-up counts
    assert projected_tpot(Resident(1, 101, 0.5), 2.0) == pytest.approx((0.5 + 2.0) / 100)


def test_with_a_tpot_objective_a_leg_runs_whole_only_if_every_resident_keeps_it():
    pace = 0.004  # s per prompt token: 300 tokens hold the decode instance up 1.2 s
    slow = Resident(generated=11, expected=101, elapsed_s=1.4)  # 0.14 s a token: 0.152 with the hold-up
    fast = Resident(generated=11, expected=101, elapsed_s=1.0)  # 0.1 s a token: 0.112 with the hold-up
    assert runs_whole(_view(600, 0, fast), pace, tpot_s=0.15)
    assert not runs_whole(_view(600, 0, fast, slow), pace, tpot_s=0.15)
    assert runs_whole(_view(600, 0, fast, slow), pace, tpot_s=0.16)
    # prompts already queued on the decode instance hold its residents up too
    assert not runs_whole(_view(2000, 1200, fast), pace, tpot_s=0.15)  # 1,500 tokens: 6 s; (1 + 9 + 6) / 100
    assert runs_whole(_view(600, 0), pace, tpot_s=0.15)  # nobody to hold up
    # a short request still prefilling elsewhere: 5 tokens, 1.2 s of hold-up over its 4 steps after the first
    assert not runs_whole(_view(600, 0, Resident(0, 5, 0.0)), pace, tpot_s=0.25)
    assert runs_whole(_view(600, 0, Resident(0, 200, 0.0)), pace, tpot_s=0.25)


def test_without_a_measured_pace_a_tpot_objective_splits():
    assert not runs_whole(_view(prefill_queue=600), None, tpot_s=0.15)


def test_the_pace_is_the_median_seconds_per_token_of_the_last_prefills():
    pace = PrefillPace(window=3)
    assert pace.seconds_per_token is None
    pace.observe(100, 0.4)
    pace.observe(0, 1.0)  # nothing computed (a cached prompt): no pace
    pace.observe(200, 0.0)  # no time: no pace
    assert pace.seconds_per_token == pytest.approx(0.004)
    pace.observe(100, 2.0)  # an odd slow one
    pace.observe(300, 0.9)
    assert pace.seconds_per_token == pytest.approx(0.004)
    pace.observe(100, 0.3)  # the first leaves the window
    assert pace.seconds_per_token == pytest.approx(0.003)
