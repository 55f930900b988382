import itertools
import json
import math
import random
import statistics

import pytest

from pdserve_tools.bench.workload import (
    ArrivalConfig,
    BenchRequest,
    LengthDist,
    RandomConfig,
    ShareGPTConfig,
    arrival_times,
    load_sharegpt,
    next_gap,
    parse_requests_jsonl,
    parse_sharegpt,
    random_requests,
    read_requests_jsonl,
    sample_sharegpt,
)


def words(text: str) -> list[str]:
    """A stand-in tokenizer: one token per whitespace-separated word."""
    return text.split()


def _gaps(times: tuple[float, ...]) -> list[float]:
    return [times[0], *(b - a for a, b in itertools.pairwise(times))]


# ---- arrivals -------------------------------------------------------------------------------------------


def test_arrivals_are_deterministic_sorted_and_normalized_to_the_rate():
    config = ArrivalConfig(rate_rps=8.0, burstiness=0.5, seed=3)
    a = arrival_times(400, config)
    assert a == arrival_times(400, config)
    assert a != arrival_times(400, ArrivalConfig(rate_rps=8.0, burstiness=0.5, seed=4))
    assert all(x <= y for x, y in itertools.pairwise(a)) and a[0] > 0
    assert a[-1] == pytest.approx(400 / 8.0)  # vLLM rescales so the offered rate is exact
    raw = arrival_times(400, ArrivalConfig(rate_rps=8.0, burstiness=0.5, seed=3, normalize=False))
    assert raw[-1] != pytest.approx(400 / 8.0)
    assert [t / raw[-1] for t in raw] == pytest.approx([t / a[-1] for t in a])  # the same draws, rescaled


def test_all_at_once_and_constant_gaps():
    assert arrival_times(5, ArrivalConfig()) == (0.0,) * 5
    steady = arrival_times(4, ArrivalConfig(rate_rps=2.0, burstiness=math.inf))
    assert steady == pytest.approx((0.5, 1.0, 1.5, 2.0))
    assert arrival_times(0, ArrivalConfig(rate_rps=1.0)) == ()
    with pytest.raises(ValueError, match="burstiness > 0"):
        ArrivalConfig(rate_rps=1.0, burstiness=0.0)


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 1.0, 2.0, 4.0])
def test_gap_coefficient_of_variation_is_one_over_sqrt_burstiness(burstiness):
    # 20,000 gaps under a fixed seed: the estimate is deterministic; 6% leaves room for the sampling error of a
    # CV (about 1.5% for shape 0.25 at this size) should the generator's algorithm ever change.
    times = arrival_times(20_000, ArrivalConfig(rate_rps=10.0, burstiness=burstiness, seed=11))
    gaps = _gaps(times)
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)


def test_next_gap_is_exponential_for_poisson_and_the_simulators_gamma_otherwise():
    # Burstiness 1 draws exactly what the simulator's Poisson arrivals draw; other shapes its gamma arrivals.
    a, b = random.Random(5), random.Random(5)
    assert [next_gap(a, 50.0) for _ in range(5)] == [b.expovariate(50.0) for _ in range(5)]
    shape = 1 / 2.0**2  # the simulator's gamma_cv = 2
    assert [next_gap(a, 50.0, shape) for _ in range(5)] == [b.gammavariate(shape, (1 / 50.0) / shape)
                                                            for _ in range(5)]


# ---- lengths and random prompts -------------------------------------------------------------------------


def test_length_distributions():
    rng = random.Random(0)
    assert {LengthDist(64).sample(rng) for _ in range(10)} == {64}
    uniform = [LengthDist(100, "uniform", 0.25).sample(rng) for _ in range(5000)]
    assert min(uniform) == 75 and max(uniform) == 125  # vLLM: [floor(m(1 - r)), ceil(m(1 + r))]
    lognormal = [LengthDist(200, "lognormal", 0.8, low=10, high=1000).sample(rng) for _ in range(5000)]
    assert min(lognormal) >= 10 and max(lognormal) <= 1000
    assert statistics.median(lognormal) == pytest.approx(200, rel=0.1)
    clamped = {LengthDist(5, "uniform", 0.5, low=4, high=6).sample(rng) for _ in range(200)}  # drawn from [2, 8]
    assert clamped == {4, 5, 6}
    for bad in ({"median": 0}, {"median": 8, "kind": "zipf"}, {"median": 8, "kind": "uniform", "spread": 1.0},
                {"median": 8, "low": 9, "high": 8}):
        with pytest.raises(ValueError):
            LengthDist(**bad)


def test_random_requests_are_deterministic_with_exact_lengths_and_a_shared_prefix():
    config = RandomConfig(50, LengthDist(32, "uniform", 0.5), LengthDist(16, "uniform", 0.5),
                          token_range=(10, 1000), prefix_tokens=8, seed=2)
    reqs = random_requests(config)
    assert reqs == random_requests(config)
    assert reqs != random_requests(RandomConfig(50, config.input, config.output, (10, 1000), 8, seed=3))
    assert len(reqs) == 50
    prefix = reqs[0].prompt[:8]
    for r in reqs:
        assert isinstance(r.prompt, tuple) and r.prompt[:8] == prefix
        assert r.prompt_tokens == len(r.prompt) and 8 + 16 <= r.prompt_tokens <= 8 + 48
        assert 8 <= r.max_tokens <= 24 and all(10 <= t < 1000 for t in r.prompt)
    with pytest.raises(ValueError, match="token_range"):
        RandomConfig(1, LengthDist(4), LengthDist(4), token_range=(5, 5))


# ---- ShareGPT -------------------------------------------------------------------------------------------


def _record(*turns: tuple[str, str]) -> str:
    return json.dumps({"id": "x", "conversations": [{"from": f, "value": v} for f, v in turns]})


def test_parse_sharegpt_takes_the_first_human_and_model_turns_and_stops_at_a_truncated_tail():
    tail = '{"id": "cut", "conversations": [{"from": "human", "value": "unterminat'
    text = "[\n  " + ",\n  ".join([
        _record(("human", "hi"), ("gpt", "hello")),
        _record(("gpt", "skip me"), ("system", "s"), ("human", "q"), ("human", "q2"), ("bard", "a")),
        _record(("gpt", "no human turn")),
        _record(("human", "no answer")),
    ]) + ",\n  " + tail
    data = parse_sharegpt(text)
    assert data.records == 4 and not data.closed and data.truncated_chars == len(tail)
    assert [(c.prompt, c.completion) for c in data.conversations] == [("hi", "hello"), ("q", "a")]
    whole = parse_sharegpt("[" + _record(("user", "a"), ("chatgpt", "b")) + "]")
    assert whole.closed and whole.truncated_chars == 0 and len(whole.conversations) == 1
    with pytest.raises(ValueError, match="JSON array"):
        parse_sharegpt('{"conversations": []}')


@pytest.fixture(scope="module")
def sharegpt():
    return load_sharegpt()


def test_sharegpt_package_data_survives_its_truncation(sharegpt):
    assert not sharegpt.closed and sharegpt.truncated_chars > 0  # the shipped file is cut mid-record
    assert sharegpt.records > 17_000 and len(sharegpt.conversations) > 17_000
    assert all(c.prompt and isinstance(c.completion, str) for c in sharegpt.conversations[-50:])


def test_sample_sharegpt_filters_like_vllm_and_is_deterministic(sharegpt):
    config = ShareGPTConfig(count=300, seed=1)
    reqs = sample_sharegpt(sharegpt, words, config)
    assert reqs == sample_sharegpt(sharegpt, words, config)
    assert reqs != sample_sharegpt(sharegpt, words, ShareGPTConfig(count=300, seed=2))
    assert len(reqs) == 300
    for r in reqs:
        assert r.prompt_tokens == len(words(r.prompt)) and 4 <= r.prompt_tokens <= 1024
        assert r.max_tokens >= 4 and r.prompt_tokens + r.max_tokens <= 2048
    fixed = sample_sharegpt(sharegpt, words, ShareGPTConfig(count=20, output_tokens=2))
    assert {r.max_tokens for r in fixed} == {2}  # a fixed output length skips the output filter


def test_sharegpt_filter_bounds():
    keep = ShareGPTConfig(count=1).keeps
    assert keep(4, 4) and keep(1024, 1024) and keep(1000, 1048)
    assert not keep(3, 100) and not keep(100, 3) and not keep(1025, 4) and not keep(1000, 1049)


def test_sample_sharegpt_oversamples_or_refuses_when_too_few_survive():
    data = parse_sharegpt("[" + ",".join([_record(("human", "one two three four"), ("gpt", "a b c d e")),
                                          _record(("human", "short"), ("gpt", "a b c d"))]) + "]")
    filled = sample_sharegpt(data, words, ShareGPTConfig(count=5))
    assert filled == [BenchRequest("one two three four", 4, 5)] * 5
    with pytest.raises(ValueError, match="only 1 ShareGPT conversations pass"):
        sample_sharegpt(data, words, ShareGPTConfig(count=5, oversample=False))


# ---- a user's JSONL file --------------------------------------------------------------------------------


def test_user_jsonl_accepts_text_and_token_id_prompts():
    lines = ['{"prompt": "why is the sky blue", "max_tokens": 32}', "", '{"prompt": [1, 2, 3], "max_tokens": 4}\n']
    assert parse_requests_jsonl(lines, words) == [BenchRequest("why is the sky blue", 5, 32),
                                                  BenchRequest((1, 2, 3), 3, 4)]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ('{"prompt": "x", "max_tokens": 4', "not valid JSON"),
        ('["x", 4]', "expected an object"),
        ('{"prompt": "x"}', "'max_tokens' must be an integer >= 1, got None"),
        ('{"prompt": "x", "max_tokens": 0}', "'max_tokens' must be an integer >= 1, got 0"),
        ('{"prompt": "x", "max_tokens": true}', "'max_tokens' must be an integer"),
        ('{"prompt": "", "max_tokens": 4}', "'prompt' must be a non-empty string"),
        ('{"prompt": [1, -2], "max_tokens": 4}', "'prompt' must be .* list of token ids"),
        ('{"prompt": "x", "max_token": 4}', "unknown key\\(s\\) 'max_token'"),
    ],
)
def test_user_jsonl_errors_name_the_line(bad, reason):
    lines = ['{"prompt": "fine", "max_tokens": 1}', "", bad]
    with pytest.raises(ValueError, match=f"^reqs.jsonl line 3: {reason}"):
        parse_requests_jsonl(lines, words, "reqs.jsonl")


def test_user_jsonl_file_and_empty_file(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text('{"prompt": "a b", "max_tokens": 2}\n{"prompt": 5, "max_tokens": 2}\n')
    with pytest.raises(ValueError, match=f"{path} line 2: 'prompt'"):
        read_requests_jsonl(path, words)
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="holds no requests"):
        read_requests_jsonl(path, words)
