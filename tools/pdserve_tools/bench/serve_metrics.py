"""Serving-benchmark metrics: pure arithmetic over per-request traces, with vLLM's `bench serve` definitions.

Contract. A `RequestTrace` is what the client saw of one request: when it was sent, when each output chunk
arrived and how many tokens each carried, its prompt tokens, and an error if it failed. Times are seconds on
one monotonic clock. `summarize(traces, duration_s, slo)` returns a frozen `ServeMetrics` whose `to_json()`
uses the key names of vLLM's result files (milliseconds), so the two can be read side by side.

Definitions (vLLM `vllm/benchmarks/serve.py` and `lib/endpoint_request_func.py`):

- TTFT = first chunk's arrival - send time. E2E latency = last chunk's arrival - send time. TPOT and the SLO
  test are `pdserve_tools.slo`'s: TPOT only for requests with more than one output token; for goodput a
  request with one token has TPOT 0, so it meets any TPOT objective.
- ITL: one sample per chunk after the first, the whole gap since the previous chunk, whatever the chunk's
  token count. vLLM does not divide a multi-token chunk's gap (so with multi-token chunks mean ITL exceeds
  TPOT); we do the same by default. `MetricsOptions(itl_per_token=True)` instead spreads a k-token chunk's
  gap evenly as k samples of gap/k, which is what a per-token view of speculative decoding wants.
- Only successful requests enter the latency distributions, the token totals and the throughputs; failed
  ones are counted. Throughputs divide by the benchmark duration: pass the measured wall time (vLLM: from
  just before the first request is dispatched to the last response); left out, the span of the traces
  (first send to last chunk) stands in for it.
- Statistics: mean, population standard deviation, median and percentiles (`pdserve_tools.stats.percentile`,
  vLLM's interpolation). An empty set gives NaN (None in JSON).
- SLOs (vLLM `--goodput ttft:MS tpot:MS e2el:MS`, `Slo.parse`): a request is good when it succeeded and each
  given metric is <= its objective. Goodput = good requests / duration. SLO attainment = good / all requests
  (a failed request misses), a figure vLLM does not print.

`goodput_search(run, slo, config)` looks for the highest offered rate at which at least `config.target`
(0.9) of the requests meet both a TTFT and a TPOT objective (DistServe's per-GPU goodput); a coroutine.
`await run(rate)` gives the traces of one benchmark at that rate (a real run, or a simulator). It assumes
attainment falls as the rate rises: it probes `low_rps` and `high_rps`, then bisects the bracket [passing,
failing] until it is narrower than `tolerance_rps`, and returns the highest passing rate probed, so the answer is within
`tolerance_rps` below the boundary. That costs 2 + ceil(log2((high - low) / tolerance)) calls at most.
With a noisy `run` the bracket holds a boundary, not necessarily the last one.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from pdserve_tools.slo import Slo, tpot
from pdserve_tools.stats import percentile

DEFAULT_PERCENTILES: tuple[float, ...] = (90.0, 99.0)
_MS = 1000.0


@dataclass(frozen=True, slots=True)
class RequestTrace:
    """One request as the client saw it; `error` is None for a success, which must have streamed a chunk."""

    send_time: float
    chunk_times: tuple[float, ...] = ()
    chunk_tokens: tuple[int, ...] = ()
    prompt_tokens: int = 0
    error: str | None = None

    def __post_init__(self) -> None:
        if len(self.chunk_times) != len(self.chunk_tokens):
            raise ValueError("a trace needs one token count per chunk arrival time")
        if any(n < 1 for n in self.chunk_tokens) or self.prompt_tokens < 0:
            raise ValueError("every chunk carries at least 1 token and prompt_tokens must be >= 0")
        previous = self.send_time
        for at in self.chunk_times:
            if at < previous:
                raise ValueError("chunk arrival times must be non-decreasing and not before send_time")
            previous = at
        if self.error is None and not self.chunk_times:
            raise ValueError("a successful trace needs at least one chunk; record a request that streamed nothing "
                             "as failed (error='...')")

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def output_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft(self) -> float:
        return self._chunks()[0] - self.send_time

    @property
    def e2e(self) -> float:
        return self._chunks()[-1] - self.send_time

    @property
    def tpot(self) -> float | None:
        """`pdserve_tools.slo.tpot`: None for a request of one output token."""
        return tpot(self.ttft, self.e2e, self.output_tokens)

    def meets(self, slo: Slo) -> bool:
        """Succeeded and met every objective of `slo` (`Slo.met`)."""
        return self.ok and slo.met(self.ttft, self.tpot, self.e2e)

    def itls(self, per_token: bool = False) -> list[float]:
        times = self._chunks()
        gaps: list[float] = []
        for i in range(1, len(times)):
            gap = times[i] - times[i - 1]
            if per_token:
                k = self.chunk_tokens[i]
                gaps.extend([gap / k] * k)
            else:
                gaps.append(gap)
        return gaps

    def _chunks(self) -> tuple[float, ...]:
        if not self.chunk_times:
            raise ValueError("this trace has no output chunk, so no latency")
        return self.chunk_times


@dataclass(frozen=True, slots=True)
class Distribution:
    """Summary of one metric's samples, in seconds."""

    count: int
    mean: float
    std: float
    median: float
    percentiles: tuple[tuple[float, float], ...]  # (q in [0, 100], value)

    @classmethod
    def of(cls, values: Sequence[float], qs: Sequence[float] = DEFAULT_PERCENTILES) -> Distribution:
        if not values:
            return cls(0, math.nan, math.nan, math.nan, tuple((float(q), math.nan) for q in qs))
        mean = math.fsum(values) / len(values)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
        return cls(len(values), mean, std, percentile(values, 50.0), tuple((float(q), percentile(values, q))
                                                                          for q in qs))

    def at(self, q: float) -> float:
        for have, value in self.percentiles:
            if have == q:
                return value
        raise KeyError(f"percentile {q} was not computed; have {[p for p, _ in self.percentiles]}")

    def to_json(self, name: str) -> dict[str, float | None]:
        """vLLM's keys: mean_{name}_ms, median_..., std_..., p99_... (p99.9 for a fractional q)."""
        out = {f"mean_{name}_ms": _ms(self.mean), f"median_{name}_ms": _ms(self.median),
               f"std_{name}_ms": _ms(self.std)}
        for q, value in self.percentiles:
            word = str(int(q)) if q == int(q) else str(q)
            out[f"p{word}_{name}_ms"] = _ms(value)
        return out


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else seconds * _MS


@dataclass(frozen=True, slots=True)
class MetricsOptions:
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    itl_per_token: bool = False  # False: vLLM's one ITL sample per chunk

    def __post_init__(self) -> None:
        if any(not 0 <= q <= 100 for q in self.percentiles):
            raise ValueError("percentiles must lie in [0, 100]")


@dataclass(frozen=True, slots=True)
class ServeMetrics:
    duration_s: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    slo: Slo | None = None
    good: int = 0  # completed requests meeting every objective of `slo`

    @property
    def request_throughput(self) -> float:
        return self.completed / self.duration_s

    @property
    def output_throughput(self) -> float:
        return self.total_output_tokens / self.duration_s

    @property
    def total_token_throughput(self) -> float:
        return (self.total_input_tokens + self.total_output_tokens) / self.duration_s

    @property
    def request_goodput(self) -> float | None:
        return None if self.slo is None else self.good / self.duration_s

    @property
    def slo_attainment(self) -> float | None:
        total = self.completed + self.failed
        return None if self.slo is None or total == 0 else self.good / total

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "duration": self.duration_s, "completed": self.completed, "failed": self.failed,
            "total_input_tokens": self.total_input_tokens, "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput, "request_goodput": self.request_goodput,
            "output_throughput": self.output_throughput, "total_token_throughput": self.total_token_throughput,
            "slo": None if self.slo is None else self.slo.to_json(), "slo_attainment": self.slo_attainment,
        }
        for name, dist in (("ttft", self.ttft), ("tpot", self.tpot), ("itl", self.itl), ("e2el", self.e2e)):
            out.update(dist.to_json(name))
        return out


def trace_span(traces: Sequence[RequestTrace]) -> float:
    """First send to last chunk arrival (or last send, if later), over all traces."""
    if not traces:
        raise ValueError("no traces")
    start = min(t.send_time for t in traces)
    end = max(max(t.chunk_times, default=t.send_time) for t in traces)
    return end - start


def summarize(traces: Sequence[RequestTrace], duration_s: float | None = None, slo: Slo | None = None,
              options: MetricsOptions = MetricsOptions()) -> ServeMetrics:
    duration = trace_span(traces) if duration_s is None else duration_s
    if not duration > 0:
        raise ValueError(f"the benchmark duration must be positive, got {duration}")
    done = [t for t in traces if t.ok]
    tpots = [tp for tp in (t.tpot for t in done) if tp is not None]
    itls = [gap for t in done for gap in t.itls(options.itl_per_token)]
    qs = options.percentiles
    return ServeMetrics(
        duration_s=duration, completed=len(done), failed=len(traces) - len(done),
        total_input_tokens=sum(t.prompt_tokens for t in done), total_output_tokens=sum(t.output_tokens for t in done),
        ttft=Distribution.of([t.ttft for t in done], qs), tpot=Distribution.of(tpots, qs),
        itl=Distribution.of(itls, qs), e2e=Distribution.of([t.e2e for t in done], qs),
        slo=slo, good=0 if slo is None else sum(t.meets(slo) for t in done),
    )


@dataclass(frozen=True, slots=True)
class SearchConfig:
    low_rps: float
    high_rps: float
    tolerance_rps: float = 0.1
    target: float = 0.9  # fraction of requests that must meet the SLO

    def __post_init__(self) -> None:
        if not 0 < self.low_rps < self.high_rps or not self.tolerance_rps > 0:
            raise ValueError("goodput search needs 0 < low_rps < high_rps and tolerance_rps > 0")
        if not 0 < self.target <= 1:
            raise ValueError("goodput search needs 0 < target <= 1")


@dataclass(frozen=True, slots=True)
class Probe:
    rate_rps: float
    attainment: float
    goodput_rps: float

    def to_json(self) -> dict[str, float]:
        return {"rate_rps": self.rate_rps, "attainment": self.attainment, "goodput_rps": self.goodput_rps}


@dataclass(frozen=True, slots=True)
class SearchResult:
    rate_rps: float | None  # highest probed rate meeting the target; None if even low_rps missed it
    saturated: bool  # high_rps itself met the target: the real limit may lie above the searched range
    probes: tuple[Probe, ...]  # in the order run

    def to_json(self) -> dict[str, object]:
        return {"rate_rps": self.rate_rps, "saturated": self.saturated, "probes": [p.to_json() for p in self.probes]}


async def goodput_search(run: Callable[[float], Awaitable[Sequence[RequestTrace]]], slo: Slo,
                         config: SearchConfig) -> SearchResult:
    if slo.ttft_s is None or slo.tpot_s is None:
        raise ValueError("goodput search needs both a TTFT and a TPOT objective")
    probes: list[Probe] = []

    async def passes(rate: float) -> bool:
        traces = await run(rate)
        if not traces:
            raise ValueError(f"run({rate}) returned no traces")
        metrics = summarize(traces, slo=slo)
        probes.append(Probe(rate, metrics.slo_attainment or 0.0, metrics.request_goodput or 0.0))
        return (metrics.slo_attainment or 0.0) >= config.target

    lo, hi = config.low_rps, config.high_rps
    if not await passes(lo):
        return SearchResult(None, False, tuple(probes))
    if await passes(hi):
        return SearchResult(hi, True, tuple(probes))
    while hi - lo > config.tolerance_rps:
        mid = (lo + hi) / 2
        if await passes(mid):
            lo = mid
        else:
            hi = mid
    return SearchResult(lo, False, tuple(probes))
