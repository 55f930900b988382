"""The output-length predictor's pure parts (loss, splits, scores, calibration, the label file) and its head."""

import math
import random
from collections import Counter

import pytest
import torch

from pdserve_tools.predictor.labels import LabelRecord, LabelSettings, labelling_order, parse_lines, prompt_key
from pdserve_tools.predictor.metrics import (
    kendall_tau_b,
    mean_pinball,
    pinball,
    score,
    split_half_tau,
    split_of,
)
from pdserve_tools.predictor.store import LabelWriter, read_labels, repair_tail
from router.predictor.calibration import P90Calibrator
from router.predictor.head import (
    FitConfig,
    HeadConfig,
    QuantileHead,
    fit,
    load_head,
    pinball_loss,
    save_head,
    to_tokens,
)
from router.predictor.learned import LearnedLengthPredictor

SETTINGS = LabelSettings("tiny", 1.0, 64, 2)


def record(key: str, lengths: tuple[int, ...] = (10, 20), prompt: str = "hello") -> LabelRecord:
    return LabelRecord(key, split_of(key), prompt, 5, lengths, tuple(n == 64 for n in lengths), SETTINGS)


# ---- pinball loss ---------------------------------------------------------------------------------------


def test_pinball_charges_under_prediction_by_the_quantile_and_over_prediction_by_its_complement():
    assert pinball(10, 8, 0.9) == pytest.approx(1.8)
    assert pinball(8, 10, 0.9) == pytest.approx(0.2)
    assert pinball(10, 8, 0.5) == pinball(8, 10, 0.5) == pytest.approx(1.0)
    assert pinball(7, 7, 0.9) == 0
    assert mean_pinball([10, 8], [8, 10], 0.9) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mean_pinball([], [], 0.5)


def test_the_training_loss_is_the_mean_pinball_of_both_quantiles():
    predicted = torch.tensor([[1.0, 2.0], [3.0, 3.5], [0.0, 4.0]])
    target = torch.tensor([1.5, 2.0, 5.0])
    expected = sum(pinball(float(t), float(p[0]), 0.5) + pinball(float(t), float(p[1]), 0.9)
                   for t, p in zip(target, predicted, strict=True)) / 6
    assert float(pinball_loss(predicted, target)) == pytest.approx(expected)


# ---- splits ---------------------------------------------------------------------------------------------


def test_a_conversation_keeps_its_split_across_runs():
    # Frozen values: a change of hash or thresholds would move prompts between train and test.
    assert [split_of(k) for k in ("a", "c", "k2", "k3", "k11")] == ["train", "validation", "test", "validation",
                                                                      "test"]


def test_splits_are_about_80_10_10():
    counts = Counter(split_of(f"k{i}") for i in range(10_000))
    assert 7800 < counts["train"] < 8200 and 900 < counts["validation"] < 1100 and 900 < counts["test"] < 1100


def test_split_shares_are_validated():
    assert split_of("k2", validation=0.0, test=0.0) == "train"
    with pytest.raises(ValueError):
        split_of("a", validation=0.6, test=0.6)


# ---- scores ---------------------------------------------------------------------------------------------


def test_kendall_tau_without_ties():
    assert kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_kendall_tau_b_corrects_for_ties():
    # Pairs: 4 concordant, one tied in x only, one tied in y only: (4 - 0) / sqrt((6 - 1) * (6 - 1)).
    assert kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(0.8)
    # A pair tied in both counts in both corrections: 2 concordant of 3 pairs, sqrt(2 * 2).
    assert kendall_tau_b([1, 2, 2], [1, 5, 5]) == pytest.approx(1.0)
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))


def test_score_compares_every_sample_with_its_prompts_prediction():
    scores = score(p50=[100, 10, 300], p90=[150, 20, 310], lengths=[[90, 260], [10, 12], [300, 480]])
    # Errors per sample: 10, 160, 0, 2, 0, 180; the p90 covers 90, 10, 12, 300.
    assert scores.mae_tokens == pytest.approx(352 / 6)
    assert scores.within_50 == pytest.approx(4 / 6)
    assert scores.within_100 == pytest.approx(4 / 6)
    assert scores.p90_coverage == pytest.approx(4 / 6)
    # Medians 175, 11, 390 rank like the p50s.
    assert scores.kendall_tau == pytest.approx(1.0)
    assert (scores.prompts, scores.samples) == (3, 6)
    with pytest.raises(ValueError):
        score([1], [2], [[]])


def test_split_half_tau_ranks_prompts_by_one_half_of_their_samples_against_the_other():
    # Halves' medians: (10, 12), (50, 40), (30, 35) -> first halves 10 < 30 < 50, second 12 < 35 < 40: concordant.
    assert split_half_tau([[10, 12], [50, 40], [30, 35]]) == pytest.approx(1.0)
    # 4 samples: halves [0:2] and [2:4], medians (2, 100), (50, 1), (20, 20): every pair discordant.
    assert split_half_tau([[1, 3, 100, 100], [50, 50, 1, 1], [20, 20, 20, 20]]) == pytest.approx(-1.0)
    # A prompt with one sample has no halves; fewer than two prompts with halves: no tau.
    assert split_half_tau([[5, 6], [7]]) != split_half_tau([[5, 6], [7]])  # NaN
    assert split_half_tau([[5, 6], [9], [7, 9]]) == pytest.approx(1.0)


def test_log_lengths_become_capped_whole_tokens():
    assert to_tokens(math.log1p(41.6), 512) == 42
    assert to_tokens(math.log1p(900.0), 512) == 512
    assert to_tokens(-3.0, 512) == 0


# ---- online calibration ---------------------------------------------------------------------------------


def replay(calibrator: P90Calibrator, bias: float, requests: int, seed: int = 0) -> float:
    """Lognormal lengths whose true p90 the head misjudges by `bias`; the coverage of the last 1,000."""
    rng = random.Random(seed)
    z90 = 1.2816
    for _ in range(requests):
        median = rng.uniform(20, 200)
        raw_p90 = median * math.exp(z90 * 0.8) * bias
        issued = round(calibrator.apply(raw_p90))
        calibrator.observe(issued, round(rng.lognormvariate(math.log(median), 0.8)))
    return calibrator.coverage


@pytest.mark.parametrize("bias", [0.4, 1.0, 2.5])
def test_calibration_brings_p90_coverage_to_the_target_whatever_the_heads_bias(bias):
    calibrator = P90Calibrator(window=1000)
    coverage = replay(calibrator, bias, requests=4000)
    assert 0.87 <= coverage <= 0.93
    assert calibrator.factor == pytest.approx(1 / bias, rel=0.25)


def test_calibration_starts_neutral_and_stays_clamped():
    calibrator = P90Calibrator(max_factor=2.0, window=10)
    assert calibrator.factor == 1.0 and math.isnan(calibrator.coverage)
    for _ in range(500):
        calibrator.observe(issued_p90=10, observed=1000)  # always missed
    assert calibrator.factor == pytest.approx(2.0)
    assert calibrator.coverage == 0.0 and calibrator.observations == 500
    with pytest.raises(ValueError):
        P90Calibrator(target=1.0)


# ---- the label file -------------------------------------------------------------------------------------


def test_records_round_trip_and_a_cut_last_line_is_dropped():
    a, b = record("a"), record("b", (64, 3))
    text = a.to_json() + "\n" + b.to_json() + "\n" + record("c").to_json()[:25]
    assert parse_lines(text.splitlines(keepends=True)) == [a, b]
    assert b.capped == (True, False)


def test_a_bad_line_before_the_last_names_its_number():
    lines = [record("a").to_json() + "\n", '{"id": "b"\n', record("c").to_json() + "\n"]
    with pytest.raises(ValueError, match="line 2"):
        parse_lines(lines)
    with pytest.raises(ValueError, match="line 2"):  # a bad line that is terminated was written whole: not a cut
        parse_lines(lines[:2])


def test_an_interrupted_file_is_repaired_and_appended_to_without_duplicates(tmp_path):
    path = tmp_path / "labels.jsonl"
    assert read_labels(path) == [] and repair_tail(path) == "none"
    with LabelWriter(path) as writer:
        writer.write([record("a"), record("b")])
    with path.open("a") as f:
        f.write(record("c").to_json()[:30])  # the write in flight when the run stopped
    assert [r.id for r in read_labels(path)] == ["a", "b"]
    assert repair_tail(path) == "cut"
    with LabelWriter(path) as writer:
        writer.write([record("c")])
    assert [r.id for r in read_labels(path)] == ["a", "b", "c"]
    with path.open("a") as f:
        f.write(record("d").to_json())  # whole, but its newline lost
    assert repair_tail(path) == "terminated"
    with LabelWriter(path) as writer:
        writer.write([record("e")])
    assert [r.id for r in read_labels(path)] == ["a", "b", "c", "d", "e"]


def test_labelling_order_is_deterministic_and_labels_each_prompt_once():
    prompts = ["p1", "p2", "p1", "p3", " ", "p4"]
    order = labelling_order(prompts, seed=0)
    assert order == labelling_order(prompts, seed=0)
    assert sorted(p for _, p in order) == ["p1", "p2", "p3", "p4"]
    assert all(key == prompt_key(p) for key, p in order)


# ---- the head and the online predictor -----------------------------------------------------------------


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log(1 + prompt tokens) features; log lengths = prompt feature + gaussian noise (sd 0.5)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 5 + 1
    return x, x[:, 0] + 0.5 * torch.randn(n, generator=g)


def test_a_fitted_head_covers_the_p90_and_round_trips_through_its_file(tmp_path):
    torch.manual_seed(0)
    head = QuantileHead(HeadConfig(in_dim=1, hidden=0, dropout=0.0, features="length"))
    result = fit(head, synthetic(2000, 0), synthetic(500, 1), FitConfig(lr=1e-2, epochs=60, patience=10))
    x, y = synthetic(2000, 2)
    with torch.no_grad():
        out = head(x)
    assert (out[:, 0] <= out[:, 1]).all()
    assert 0.45 <= float((y <= out[:, 0]).float().mean()) <= 0.55
    assert 0.86 <= float((y <= out[:, 1]).float().mean()) <= 0.94
    assert result.best_epoch <= result.epochs
    save_head(head, tmp_path / "head.pt")
    with torch.no_grad():
        assert torch.equal(load_head(tmp_path / "head.pt")(x), out)


def test_the_online_predictor_returns_capped_ordered_quantiles_and_learns_from_finished_requests():
    torch.manual_seed(0)
    head = QuantileHead(HeadConfig(in_dim=1, hidden=0, dropout=0.0, features="length"))
    fit(head, synthetic(1000, 0), synthetic(200, 1), FitConfig(lr=1e-2, epochs=20))
    predictor = LearnedLengthPredictor(head)
    prediction = predictor.predict_text("ignored by a length-only head", prompt_tokens=100, max_tokens=4096)
    assert 0 < prediction.p50 <= prediction.p90 < 4096
    capped = predictor.predict_text("x", prompt_tokens=100, max_tokens=prediction.p50)
    assert capped.p50 == capped.p90 == prediction.p50
    for _ in range(50):
        predictor.observe(prediction, generated=prediction.p90 * 3)  # every request outlives its p90
    raised = predictor.predict_text("x", prompt_tokens=100, max_tokens=4096)
    assert raised.p50 == prediction.p50 and raised.p90 > prediction.p90
