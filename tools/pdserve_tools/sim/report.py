"""Per-request timings and a per-policy summary from a `SimResult`. Pure.

TTFT runs from arrival to the first token (prefill done); TPOT is the mean time per output token after the
first ((e2e - TTFT) / (tokens - 1), requests of two tokens or more); goodput counts requests served within
both SLOs per second of simulated time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve_tools.sim.simulator import SimResult


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_s: float = 2.0
    tpot_s: float = 0.05


@dataclass(frozen=True, slots=True)
class Summary:
    policy: str
    served: int
    rejected: int
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    e2e_p50: float
    e2e_p99: float
    slo_attainment: float  # share of all requests served within both SLOs
    goodput_rps: float
    preemptions: int
    truncations: int
    wall_s: float


def quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timings(result: SimResult) -> tuple[list[float], list[float], list[float]]:
    """Per served request: TTFT, TPOT (nan for one-token outputs) and end-to-end latency, in rid order."""
    ttft, tpot, e2e = [], [], []
    for req in result.requests:
        end = result.finished_at[req.rid]
        if math.isnan(end):
            continue
        first = result.first_token_at[req.rid] - req.arrival
        ttft.append(first)
        e2e.append(end - req.arrival)
        tpot.append((end - req.arrival - first) / (req.output_tokens - 1) if req.output_tokens > 1 else math.nan)
    return ttft, tpot, e2e


def summarize(policy: str, result: SimResult, slo: Slo | None = None) -> Summary:
    slo = slo or Slo()
    ttft, tpot, e2e = timings(result)
    good = sum(1 for a, b in zip(ttft, tpot, strict=True) if a <= slo.ttft_s and (math.isnan(b) or b <= slo.tpot_s))
    span = max((t for t in result.finished_at if not math.isnan(t)), default=0.0)
    tpots = [t for t in tpot if not math.isnan(t)]
    return Summary(
        policy, len(ttft), result.rejected, quantile(ttft, 0.5), quantile(ttft, 0.99), quantile(tpots, 0.5),
        quantile(tpots, 0.99), quantile(e2e, 0.5), quantile(e2e, 0.99), good / max(len(result.requests), 1),
        good / span if span > 0 else 0.0, result.preemptions, result.truncations, result.wall_s,
    )


def table(rows: list[Summary]) -> str:
    head = (f"{'policy':<22}{'served':>9}{'rej':>8}{'ttft p50':>10}{'ttft p99':>10}{'tpot p50':>10}{'tpot p99':>10}"
            f"{'e2e p99':>10}{'slo %':>8}{'goodput':>9}{'preempt':>9}{'wall s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.policy:<22}{r.served:>9}{r.rejected:>8}{r.ttft_p50:>10.3f}{r.ttft_p99:>10.3f}{r.tpot_p50 * 1e3:>9.1f}m"
            f"{r.tpot_p99 * 1e3:>9.1f}m{r.e2e_p99:>10.2f}{r.slo_attainment * 100:>8.1f}{r.goodput_rps:>9.1f}"
            f"{r.preemptions:>9}{r.wall_s:>8.2f}"
        )
    return "\n".join(lines)
