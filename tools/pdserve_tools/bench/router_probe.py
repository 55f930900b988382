"""The pdserve router's load over one stretch of a benchmark, seen from outside its process.

Contract. `RouterProbe.start(pid, metrics_url)` reads the router process's CPU time (utime + stime of every thread,
from /proc/PID/stat) and scrapes its Prometheus endpoint; `stop(tokens, client_ttfts_ms)` does both again and
returns a `RouterLoad` over the stretch: CPU seconds per token streamed (`tokens`, counted by the client), the p99
of `pdserve_event_loop_lag_seconds` over the samples taken in the stretch (bucket counts subtracted, then
Prometheus's `histogram_quantile` interpolation), and the router's own mean TTFT over the requests that finished in
it (`pdserve_time_to_first_token_seconds`, arrival at the router to first token sent) beside the client's mean.
The parsing and the quantile are pure functions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve_tools.stats import percentile

LOOP_LAG = "pdserve_event_loop_lag_seconds"
TTFT = "pdserve_time_to_first_token_seconds"
_UTIME_FIELD = 11  # utime, then stime, counted from the field after the command name in /proc/PID/stat


@dataclass(frozen=True, slots=True)
class RouterLoad:
    cpu_s_per_token: float
    loop_lag_p99_ms: float
    router_ttft_mean_ms: float  # NaN: no request finished in the stretch
    client_ttft_mean_ms: float

    def to_json(self) -> dict[str, float | None]:
        return {k: None if math.isnan(v) else v for k, v in (("cpu_s_per_token", self.cpu_s_per_token),
                                                             ("loop_lag_p99_ms", self.loop_lag_p99_ms))}

    @staticmethod
    def median(loads: Sequence[RouterLoad]) -> RouterLoad:
        """Each figure's median over runs."""
        def med(values: list[float]) -> float:
            return percentile((v for v in values if not math.isnan(v)), 50)

        return RouterLoad(med([x.cpu_s_per_token for x in loads]), med([x.loop_lag_p99_ms for x in loads]),
                          med([x.router_ttft_mean_ms for x in loads]), med([x.client_ttft_mean_ms for x in loads]))


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
    """A histogram's `_sum` and `_count` from Prometheus text ((0, 0) when it is absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(text) if f.name == name for s in f.samples}
    return values.get(f"{name}_sum", 0.0), values.get(f"{name}_count", 0.0)


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


def mean_between(before: tuple[float, float], after: tuple[float, float]) -> float:
    """The mean of the samples a histogram observed between two scrapes of its (sum, count); NaN for none."""
    count = after[1] - before[1]
    return (after[0] - before[0]) / count if count > 0 else math.nan


# ---- probing -------------------------------------------------------------------------------------------------


def read_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        return cpu_seconds(f.read(), os.sysconf("SC_CLK_TCK"))


async def scrape(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30.0)) as http, http.get(url) as reply:
        reply.raise_for_status()
        return await reply.text()


class RouterProbe:
    def __init__(self, pid: int, metrics_url: str, cpu_s: float, metrics: str) -> None:
        self._pid = pid
        self._url = metrics_url
        self._cpu_s = cpu_s
        self._metrics = metrics

    @classmethod
    async def start(cls, pid: int, metrics_url: str | None) -> RouterProbe:
        if metrics_url is None:
            raise ValueError("a router probe needs the router's metrics URL")
        metrics = await scrape(metrics_url)
        return cls(pid, metrics_url, read_cpu_seconds(pid), metrics)

    async def stop(self, tokens: int, client_ttfts_ms: Sequence[float]) -> RouterLoad:
        cpu_s = read_cpu_seconds(self._pid) - self._cpu_s
        metrics = await scrape(self._url)
        lag = bucket_delta(buckets(self._metrics, LOOP_LAG), buckets(metrics, LOOP_LAG))
        router_ttft = mean_between(sum_count(self._metrics, TTFT), sum_count(metrics, TTFT))
        client = sum(client_ttfts_ms) / len(client_ttfts_ms) if client_ttfts_ms else math.nan
        return RouterLoad(cpu_s / tokens if tokens else math.nan, histogram_quantile(0.99, lag) * 1000,
                          router_ttft * 1000, client)
