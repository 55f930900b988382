"""Shedding's arithmetic (`router.placement.slo`): the projected TTFT and the retry hint of a refused request."""

from __future__ import annotations

import pytest

from router.placement.slo import Objectives, projected_ttft, shed_after


def test_the_first_token_comes_after_the_wait_so_far_and_every_prompt_token_queued_ahead_and_its_own() -> None:
    assert projected_ttft(0.5, 1000, 200, 0.003) == pytest.approx(0.5 + 3.6)
    assert projected_ttft(0.0, 0, 200, 0.003) == pytest.approx(0.6)


def test_a_leg_projected_within_the_objective_is_kept_and_one_beyond_it_is_refused_with_the_excess() -> None:
    assert shed_after(0.0, 0, 200, 0.003, ttft_s=1.0, floor_s=0.1) is None
    assert shed_after(0.0, 200, 200, 0.003, ttft_s=1.2, floor_s=0.1) is None  # exactly on the objective
    assert shed_after(0.2, 1000, 200, 0.003, ttft_s=2.0, floor_s=0.1) == pytest.approx(1.8)
    assert shed_after(0.0, 0, 400, 0.003, ttft_s=1.0, floor_s=0.5) == pytest.approx(0.5)  # 0.2 s over: the floor


def test_nothing_is_refused_before_a_pace_is_known() -> None:
    assert shed_after(10.0, 10**6, 200, None, ttft_s=1.0, floor_s=0.1) is None


def test_shedding_needs_a_ttft_objective() -> None:
    with pytest.raises(ValueError, match="TTFT objective"):
        Objectives(tpot_s=0.1, shed=True)
    assert Objectives(ttft_s=2.0, shed=True).shed
