"""Per-request timings and a per-policy summary from a `SimResult`. Pure.

TTFT runs from arrival to the first token (prefill done), E2E to the last; TPOT and the SLO test are
`pdserve_tools.slo`'s (a one-token request has no TPOT, and meets any TPOT objective); percentiles are
`pdserve_tools.stats.percentile`. Goodput counts requests served within `slo` (by default `DEFAULT_SLO`) per
second of simulated time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve_tools.sim.simulator import SimResult
from pdserve_tools.slo import Slo, tpot
from pdserve_tools.stats import percentile

DEFAULT_SLO = Slo(ttft_s=2.0, tpot_s=0.05)


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
    prefill_tokens: int = 0  # prompt tokens the prefill engines computed
    prefix_hit_rate: float = 0.0  # prompt blocks found in the chosen prefill instance's tracked prefixes


def timings(result: SimResult) -> tuple[list[float], list[float | None], list[float]]:
    """Per served request: TTFT, TPOT (None for one-token outputs) and end-to-end latency, in rid order."""
    ttfts: list[float] = []
    tpots: list[float | None] = []
    e2es: list[float] = []
    for req in result.requests:
        end = result.finished_at[req.rid]
        if math.isnan(end):
            continue
        ttft, e2e = result.first_token_at[req.rid] - req.arrival, end - req.arrival
        ttfts.append(ttft)
        tpots.append(tpot(ttft, e2e, req.output_tokens))
        e2es.append(e2e)
    return ttfts, tpots, e2es


def summarize(policy: str, result: SimResult, slo: Slo = DEFAULT_SLO) -> Summary:
    ttfts, tpots, e2es = timings(result)
    good = sum(map(slo.met, ttfts, tpots, e2es))
    span = max((t for t in result.finished_at if not math.isnan(t)), default=0.0)
    some = [t for t in tpots if t is not None]
    return Summary(
        policy, len(ttfts), result.rejected, percentile(ttfts, 50), percentile(ttfts, 99), percentile(some, 50),
        percentile(some, 99), percentile(e2es, 50), percentile(e2es, 99), good / max(len(result.requests), 1),
        good / span if span > 0 else 0.0, result.preemptions, result.truncations, result.wall_s,
        result.prefill_tokens, result.prefix_hits / result.prefix_blocks if result.prefix_blocks else 0.0,
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
