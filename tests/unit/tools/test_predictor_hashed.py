"""The hashed-feature predictor (features, censored loss, fit, head file) and the remaining-length estimate."""

import math
import random
import zlib

import pytest
import torch

from pdserve_tools.predictor.evaluate import summary
from pdserve_tools.predictor.hashed_fit import HashedFitConfig, censored_pinball, fit_hashed, prompts
from pdserve_tools.predictor.labels import LabelRecord, LabelSettings
from pdserve_tools.predictor.metrics import kendall_tau_b, pinball, split_of
from pdserve_tools.predictor.refine import remaining_given
from pdserve_tools.predictor.refine_eval import EmpiricalRemaining, score_remaining
from router.predictor.hashed import DENSE, MAX_WORDS, feature_matrix, sparse_features
from router.predictor.head import load_head, save_head
from router.predictor.learned import LearnedLengthPredictor
from router.predictor.prediction import LengthPrediction, remaining

CAP = 64
SETTINGS = LabelSettings("tiny", 1.0, CAP, 4)


def record(key: str, prompt: str, lengths: tuple[int, ...], split: str | None = None) -> LabelRecord:
    return LabelRecord(key, split or split_of(key), prompt, 5, lengths, tuple(n == CAP for n in lengths), SETTINGS)


# ---- features -------------------------------------------------------------------------------------------


def test_each_distinct_ngram_lands_in_its_crc32_bucket_with_a_sign_and_the_hashed_part_has_unit_norm():
    buckets = 1 << 20  # no collisions among three grams
    pairs = dict(sparse_features("Hello hello world", 7, buckets))
    expected = {}
    for gram in ("u hello", "u world", "b hello hello", "b hello world"):
        h = zlib.crc32(gram.encode())
        expected[h % buckets] = 1.0 if h & 0x80000000 else -1.0
    hashed = {c: v for c, v in pairs.items() if c < buckets}
    assert set(hashed) == set(expected)
    assert all(hashed[c] == pytest.approx(expected[c] / 2) for c in expected)  # 4 grams: norm 2
    assert pairs[buckets + DENSE.index("log_prompt_tokens")] == pytest.approx(math.log1p(7))
    assert pairs[buckets + DENSE.index("log_words")] == pytest.approx(math.log1p(3))


def test_features_read_word_order_lines_code_and_a_closing_question():
    def row(text: str) -> dict[int, float]:
        return dict(sparse_features(text, 5, 4096))

    assert row("a b") != row("b a")  # the bigram differs
    assert row("Why?") == row("why ?")  # case and spacing of punctuation do not matter
    code, question, lines = (4096 + DENSE.index(n) for n in ("has_code", "ends_with_question", "log_lines"))
    assert row("fix this:\n```\nx = 1\n```")[code] == 1.0 and code not in row("fix this please")
    assert row("is it? ")[question] == 1.0 and question not in row("it is.")
    assert row("a\nb\nc")[lines] == pytest.approx(math.log1p(2))


def test_features_are_bounded_by_max_words_and_checked():
    long = " ".join(f"w{i}" for i in range(3 * MAX_WORDS))
    assert dict(sparse_features(long, 9, 1 << 20))[(1 << 20) + DENSE.index("log_words")] == pytest.approx(
        math.log1p(MAX_WORDS))
    with pytest.raises(ValueError):
        sparse_features("x", 1, 0)
    with pytest.raises(ValueError):
        feature_matrix(["x"], [1, 2], 8)


def test_the_feature_matrix_is_the_sparse_features_made_dense():
    texts, tokens = ["one two", "", "three?"], [3, 1, 4]
    x = feature_matrix(texts, tokens, 64)
    assert x.shape == (3, 64 + len(DENSE))
    for row, (text, n) in enumerate(zip(texts, tokens, strict=True)):
        dense = torch.zeros(64 + len(DENSE))
        for column, value in sparse_features(text, n, 64):
            dense[column] = value
        assert torch.equal(x[row], dense)


# ---- the censored loss and the fit ----------------------------------------------------------------------


def test_a_capped_sample_charges_under_prediction_only():
    data = prompts([record("k", "p", (10, CAP))], buckets=8)
    y10, ycap = math.log1p(10), math.log1p(CAP)
    high = torch.tensor([[ycap + 1.0, ycap + 2.0]])  # both above the cap: only the uncapped sample charges
    expected = (pinball(y10, ycap + 1.0, 0.5) + pinball(y10, ycap + 2.0, 0.9)) / 4
    assert float(censored_pinball(high, data)) == pytest.approx(expected, rel=1e-5)
    low = torch.tensor([[1.0, 1.5]])  # both below every sample: the capped one charges like any other
    expected = sum(pinball(y, p, q) for y in (y10, ycap) for p, q in ((1.0, 0.5), (1.5, 0.9))) / 4
    assert float(censored_pinball(low, data)) == pytest.approx(expected, rel=1e-5)


def test_missing_samples_are_masked_out():
    one = prompts([record("a", "p", (10,))], buckets=8)
    two = prompts([record("a", "p", (10,)), record("b", "q", (20, 30))], buckets=8)
    assert two.weight.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    predicted = torch.tensor([[2.0, 3.0]])
    assert float(censored_pinball(predicted, one)) == pytest.approx(
        (pinball(math.log1p(10), 2.0, 0.5) + pinball(math.log1p(10), 3.0, 0.9)) / 2, rel=1e-5)


def synthetic_records(n: int, seed: int, split: str) -> list[LabelRecord]:
    """Prompts that ask for a story run long (often to the cap); those that ask for a word stay short."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        long = rng.random() < 0.5
        topic = rng.choice(["cats", "ships", "rain", "maths", "tea"])
        prompt = f"write a long story about {topic}" if long else f"give one word for {topic}"
        lengths = tuple(min(rng.randint(40, 90), CAP) if long else rng.randint(2, 12) for _ in range(4))
        out.append(record(f"{split}{seed}-{i}", prompt, lengths, split))
    return out


def test_a_fitted_hashed_head_ranks_prompts_by_their_words_and_loads_as_its_kind(tmp_path):
    torch.set_num_threads(1)
    train, validation = synthetic_records(200, 0, "train"), synthetic_records(50, 1, "validation")
    fit = fit_hashed(train, validation, HashedFitConfig(buckets=256, penalties=(1e-3,), steps=300, patience=50))
    save_head(fit.head, tmp_path / "head.pt")
    assert load_head(tmp_path / "head.pt").config.features == "hashed"
    predictor = LearnedLengthPredictor.load(tmp_path / "head.pt")
    short = predictor.predict_text("give one word for cats", 5, CAP)
    long = predictor.predict_text("write a long story about cats", 5, CAP)
    assert short.p50 < 20 < 40 < long.p50 <= long.p90 <= CAP
    test = synthetic_records(60, 2, "test")
    p50 = [predictor.predict_text(r.prompt, r.prompt_tokens, CAP).p50 for r in test]
    assert kendall_tau_b(p50, [sorted(r.lengths)[2] for r in test]) > 0.5


# ---- the remaining-length estimate ----------------------------------------------------------------------


def test_before_the_first_token_the_conditional_estimate_is_the_prediction():
    assert remaining_given(LengthPrediction(100, 300), 0, 1000) == LengthPrediction(100, 300)


def test_a_request_past_its_p50_still_has_a_long_way_to_go():
    prediction = LengthPrediction(100, 300)
    plain, given = remaining(prediction, 200, 1000), remaining_given(prediction, 200, 1000)
    assert plain.p50 == 1
    assert 50 < given.p50 < given.p90
    # The longer it has run, the later it ends, but never beyond max_tokens.
    ends = [g + remaining_given(prediction, g, 1000).p50 for g in (0, 50, 100, 200, 400, 800)]
    assert ends == sorted(ends) and ends[0] < ends[-1] <= 1000
    assert remaining_given(prediction, 900, 1000).p90 == 100
    assert remaining_given(prediction, 1000, 1000) == LengthPrediction(0, 0)


@pytest.mark.parametrize("prediction", [LengthPrediction(50, 50), LengthPrediction(0, 30), LengthPrediction(0, 0)])
def test_a_prediction_without_spread_or_median_falls_back_to_the_plain_estimate(prediction):
    for g in (0, 10, 49, 60):
        assert remaining_given(prediction, g, 100) == remaining(prediction, g, 100)


def test_scores_of_remaining_estimates_count_each_still_running_sample_at_each_g():
    records = [record("a", "p", (10, 50))]
    overall, per_g = score_remaining(lambda p, g, cap: LengthPrediction(5, 40), [LengthPrediction(5, 9)], records,
                                     grid=(1, 20))
    # Cases: g=1 -> truths 9 and 49; g=20 -> 30 (10 has ended).
    assert (overall.cases, per_g[1].cases, per_g[20].cases) == (3, 2, 1)
    assert overall.p90_coverage == pytest.approx(2 / 3)
    assert overall.pinball_p50 == pytest.approx((2 + 22 + 12.5) / 3)
    assert per_g[20].within_100 == 1.0


def test_the_empirical_reference_uses_the_samples_still_running_in_the_same_quartile():
    records = [record(f"k{i}", "p", lengths) for i, lengths in enumerate([(1, 2), (3, 4), (10, 60), (20, 64)])]
    predictions = [LengthPrediction(p, p) for p in (1, 2, 30, 40)]
    estimate = EmpiricalRemaining(predictions, records)
    # A prediction in the top quartile (p50 above the 75th percentile, 32.5) sees lengths 20 and 64.
    assert estimate(LengthPrediction(50, 60), 10, CAP) == LengthPrediction(32, 50)
    assert estimate(LengthPrediction(50, 60), 64, CAP) == LengthPrediction(0, 0)  # nothing left
    assert estimate(LengthPrediction(1, 1), 10, CAP) == LengthPrediction(1, 1)  # none ran that long: one more


def test_the_summary_holds_the_headline_figures_of_the_chosen_head_and_the_baseline():
    figures = {"kendall_tau": 0.3, "cost_ms_p50": 0.2, "p90_coverage": 0.9, "within_100": 0.6, "mae_tokens": 9.0}
    base = {**figures, "kendall_tau": 0.0}
    assert summary(figures, base) == {"tau": 0.3, "cost_ms_p50": 0.2, "p90_coverage": 0.9, "within_100": 0.6,
                                      "baseline": {"tau": 0.0, "cost_ms_p50": 0.2, "p90_coverage": 0.9,
                                                   "within_100": 0.6}}
