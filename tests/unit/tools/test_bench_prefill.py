"""`pdserve bench prefill`'s pure parts: the prompts both targets get, and the report's ratios."""

from __future__ import annotations

from pdserve_tools.bench.prefill import prompts, ratios, report, warmup_prompts
from pdserve_tools.bench.serve_data import TOKEN_RANGE


def test_every_prompt_is_new_and_the_same_on_every_call() -> None:
    work = prompts([100, 250], reps=3)
    assert [len(p) for p in work[100]] == [100] * 3 and [len(p) for p in work[250]] == [250] * 3
    assert work == prompts([100, 250], reps=3)  # both targets get the same prompts
    every = [tuple(p) for batch in work.values() for p in batch] + [tuple(p) for p in warmup_prompts([100, 250])]
    assert len(set(every)) == len(every)
    # No two prompts share even their first block, so no prefix cache entry serves another prompt.
    assert len({p[:16] for p in every}) == len(every)
    assert all(TOKEN_RANGE[0] <= t < TOKEN_RANGE[1] for p in every for t in p)


def test_the_report_divides_pdserve_by_plain_vllm_per_length() -> None:
    targets = {"vllm": {"prefill_ms": [400.0, 900.0]}, "pdserve-1p1d": {"prefill_ms": [440.0, 1800.0]},
               "pdserve-colocated": {"prefill_ms": [400.0, 450.0]}}
    result = report("m", [100, 250], 3, targets)
    assert result["ratio"] == {"pdserve-1p1d": [1.1, 2.0], "pdserve-colocated": [1.0, 0.5]}
    assert result["lengths"] == [100, 250] and result["reps"] == 3
    assert report("m", [100], 3, {"vllm": {"prefill_ms": [1.0]}})["ratio"] == {}
    assert ratios([1.0, 1.0], [0.0, float("nan")]) == [None, None]


def test_the_cost_model_is_set_against_each_targets_live_steps() -> None:
    targets = {"vllm": {"prefill_ms": [400.0]}, "pdserve-1p1d": {"prefill_ms": [440.0], "step_ms": [400.0]}}
    result = report("m", [100], 3, targets, cost_model_ms=[320.0])
    assert result["cost_model_ms"] == [320.0] and result["cost_model_x_step"] == {"pdserve-1p1d": [0.8]}
