"""The pdserve router's load over one stretch of a benchmark, seen from outside its process.

Contract. `RouterProbe.start(pid, metrics_url)` starts sampling, every `PERIOD_S` on the running loop, the router
process's CPU time (utime + stime of every thread, from /proc/PID/stat) and its Prometheus metrics, each sample
stamped with `time.time()` (the wall clock guidellm stamps its benchmarks with). `stop(window)` ends the sampling
and returns a `RouterLoad` over the window (wall-clock start and end, the tokens streamed to the client in it, the
client's TTFTs of the requests that finished in it): CPU seconds per token (the CPU time interpolated at the two
ends), the p99 of `pdserve_event_loop_lag_seconds` over the lag samples taken in it (bucket counts of the last
scrape at or before its start subtracted from the first at or after its end, then Prometheus's
`histogram_quantile` interpolation), the router's own mean TTFT over the requests that finished in it
(`pdserve_time_to_first_token_seconds`: arrival at the router to first token) beside the client's mean, and the
mean engine step per worker role (`pdserve_engine_step_seconds`, every instance of the role together), which tells
an engine that ran slower apart from time lost between the engine and the client.
Sampling costs the router one scrape per period. A scrape the router does not answer within `SCRAPE_TIMEOUT_S`
is skipped and counted (`RouterLoad.missed_scrapes`): the figures then come from the samples around it. The
parsing, the interpolation and the quantile are pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pdserve_tools.stats import percentile

LOOP_LAG = "pdserve_event_loop_lag_seconds"
TTFT = "pdserve_time_to_first_token_seconds"
ENGINE_STEP = "pdserve_engine_step_seconds"
_UTIME_FIELD = 11  # utime, then stime, counted from the field after the command name in /proc/PID/stat
PERIOD_S = 1.0
SCRAPE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # time.time()
    cpu_s: float
    metrics: str  # Prometheus text


@dataclass(frozen=True, slots=True)
class Window:
    """A stretch of a benchmark as the client measured it."""

    start: float  # time.time()
    end: float
    tokens: int  # streamed to the client
    client_ttfts_ms: tuple[float, ...]  # of the requests that finished


@dataclass(frozen=True, slots=True)
class RouterLoad:
    cpu_s_per_token: float
    loop_lag_p99_ms: float
    router_ttft_mean_ms: float  # NaN: no request finished in the stretch
    client_ttft_mean_ms: float
    missed_scrapes: int = 0  # the router's /metrics unanswered while sampling this stretch (`median`: the sum)
    engine_step_ms: dict[str, float] = dataclasses.field(default_factory=dict)  # role -> mean step; roles that stepped

    def to_json(self) -> dict[str, Any]:
        figures = {k: None if math.isnan(v) else v for k, v in (
            ("cpu_s_per_token", self.cpu_s_per_token), ("loop_lag_p99_ms", self.loop_lag_p99_ms),
            ("router_ttft_mean_ms", self.router_ttft_mean_ms), ("client_ttft_mean_ms", self.client_ttft_mean_ms))}
        return {**figures, "missed_scrapes": self.missed_scrapes, "engine_step_ms": dict(self.engine_step_ms)}

    @staticmethod
    def median(loads: Sequence[RouterLoad]) -> RouterLoad:
        """Each figure's median over runs."""
        def med(values: list[float]) -> float:
            return percentile((v for v in values if not math.isnan(v)), 50)

        roles = sorted({role for x in loads for role in x.engine_step_ms})
        return RouterLoad(med([x.cpu_s_per_token for x in loads]), med([x.loop_lag_p99_ms for x in loads]),
                          med([x.router_ttft_mean_ms for x in loads]), med([x.client_ttft_mean_ms for x in loads]),
                          sum(x.missed_scrapes for x in loads),
                          {role: med([x.engine_step_ms[role] for x in loads if role in x.engine_step_ms])
                           for role in roles})


# ---- pure ----------------------------------------------------------------------------------------------------


def cpu_seconds(stat: str, ticks_per_s: int) -> float:
    """utime + stime of a /proc/PID/stat line, in seconds (the command name may hold spaces and parentheses)."""
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[_UTIME_FIELD]) + int(fields[_UTIME_FIELD + 1])) / ticks_per_s


def buckets(text: str, name: str) -> list[tuple[float, float]]:
    """A histogram's cumulative buckets `(upper bound, count)`, by bound, from Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    found = [(float(s.labels["le"]), s.value) for f in text_string_to_metric_families(text) if f.name == name
             for s in f.samples if s.name == f"{name}_bucket"]
    return sorted(found)


def sum_count(text: str, name: str) -> tuple[float, float]:
    """A histogram's `_sum` and `_count` from Prometheus text, over all its series ((0, 0) when it is absent)."""
    return sum_count_by(text, name, None).get("", (0.0, 0.0))


def sum_count_by(text: str, name: str, label: str | None) -> dict[str, tuple[float, float]]:
    """A histogram's `_sum` and `_count` added up over the series that share each value of `label` (None: over all
    series, under the key "")."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for s in (s for f in text_string_to_metric_families(text) if f.name == name for s in f.samples):
        key = "" if label is None else s.labels[label]
        if s.name == f"{name}_sum":
            sums[key] = sums.get(key, 0.0) + s.value
        elif s.name == f"{name}_count":
            counts[key] = counts.get(key, 0.0) + s.value
    return {key: (sums.get(key, 0.0), counts.get(key, 0.0)) for key in sums.keys() | counts.keys()}


def bucket_delta(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The buckets of the samples observed between two scrapes."""
    earlier = dict(before)
    return [(le, count - earlier.get(le, 0.0)) for le, count in after]


def histogram_quantile(q: float, cumulative: list[tuple[float, float]]) -> float:
    """Prometheus's `histogram_quantile`: linear inside the bucket the rank falls in, the lowest bucket from 0; a
    rank in the +Inf bucket gives the highest finite bound. NaN for no samples."""
    if not cumulative or cumulative[-1][1] <= 0:
        return math.nan
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0.0
    for le, count in cumulative:
        if count >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / (count - below) if count > below else le
        lower, below = le, count
    return lower


def cpu_at(samples: Sequence[Sample], at: float) -> float:
    """The CPU time at `at`, interpolated between the samples around it (clamped to the first and last)."""
    if at <= samples[0].at:
        return samples[0].cpu_s
    for a, b in itertools.pairwise(samples):
        if at <= b.at:
            return a.cpu_s + (b.cpu_s - a.cpu_s) * (at - a.at) / (b.at - a.at) if b.at > a.at else b.cpu_s
    return samples[-1].cpu_s


def around(samples: Sequence[Sample], start: float, end: float) -> tuple[Sample, Sample]:
    """The last sample at or before `start` and the first at or after `end` (else the first and the last)."""
    before = next((s for s in reversed(samples) if s.at <= start), samples[0])
    after = next((s for s in samples if s.at >= end), samples[-1])
    return before, after


def load_over(samples: Sequence[Sample], window: Window) -> RouterLoad:
    """The router's load over `window`, from samples taken around it."""
    cpu_s = cpu_at(samples, window.end) - cpu_at(samples, window.start)
    before, after = around(samples, window.start, window.end)
    lag = bucket_delta(buckets(before.metrics, LOOP_LAG), buckets(after.metrics, LOOP_LAG))
    router_ttft = mean_between(sum_count(before.metrics, TTFT), sum_count(after.metrics, TTFT))
    ttfts = window.client_ttfts_ms
    steps_before = sum_count_by(before.metrics, ENGINE_STEP, "role")
    steps = {role: mean_between(steps_before.get(role, (0.0, 0.0)), after_role) * 1000
             for role, after_role in sum_count_by(after.metrics, ENGINE_STEP, "role").items()}
    return RouterLoad(cpu_s / window.tokens if window.tokens else math.nan, histogram_quantile(0.99, lag) * 1000,
                      router_ttft * 1000, sum(ttfts) / len(ttfts) if ttfts else math.nan,
                      engine_step_ms={role: ms for role, ms in sorted(steps.items()) if not math.isnan(ms)})


def mean_between(before: tuple[float, float], after: tuple[float, float]) -> float:
    """The mean of the samples a histogram observed between two scrapes of its (sum, count); NaN for none."""
    count = after[1] - before[1]
    return (after[0] - before[0]) / count if count > 0 else math.nan


# ---- probing -------------------------------------------------------------------------------------------------


def read_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        return cpu_seconds(f.read(), os.sysconf("SC_CLK_TCK"))


async def scrape(url: str, timeout_s: float = 30.0) -> str:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http, http.get(url) as reply:
        reply.raise_for_status()
        return await reply.text()


class RouterProbe:
    """Samples one router until stopped (see the module's contract)."""

    def __init__(self, pid: int, metrics_url: str) -> None:
        self._pid = pid
        self._url = metrics_url
        self._samples: list[Sample] = []
        self._missed = 0
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, pid: int, metrics_url: str | None) -> RouterProbe:
        if metrics_url is None:
            raise ValueError("a router probe needs the router's metrics URL")
        probe = cls(pid, metrics_url)
        await probe._sample()
        probe._task = asyncio.create_task(probe._run(), name="router-probe")
        return probe

    async def stop(self, window: Window) -> RouterLoad:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._sample()
        return dataclasses.replace(load_over(self._samples, window), missed_scrapes=self._missed)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(PERIOD_S)  # the sampling period
            await self._sample()

    async def _sample(self) -> None:
        import aiohttp

        try:
            metrics = await scrape(self._url, SCRAPE_TIMEOUT_S)
        except (TimeoutError, aiohttp.ClientError):
            if not self._samples:
                raise  # no sample to measure from
            self._missed += 1
            return
        self._samples.append(Sample(time.time(), read_cpu_seconds(self._pid), metrics))
