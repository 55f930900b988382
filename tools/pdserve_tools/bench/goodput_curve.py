"""Goodput as DistServe measures it: the highest request rate at which a target keeps at least a target share
(90%) of its requests within an SLO. Pure code; `bench goodput` (`goodput`) runs it against live targets.

Contract.
- `Point(rate_rps, attainment)`: one run's SLO attainment (share of requests that succeeded and met the SLO) at
  an offered rate.
- `max_rate(points, target)` reads the attainment curve from its lowest rate up to its first point below
  `target` and returns where it crosses `target`: linearly interpolated between the last point at or above it
  and that first point below it. `Goodput.rate_rps` is None when even the lowest rate missed (the limit lies
  below the range run); `saturated` when no rate missed (the limit lies at or above the highest rate run).
- `climb(run, slos, rates, target)` runs the rates lowest first, each once (`await run(rate)`: the request set's
  traces at that rate), and stops after the first rate at which every SLO missed `target`: a higher rate is taken
  to miss too, and is not run. One run serves every SLO. It returns each SLO's points, in the order run.
- `median_goodput(results)`: the lower median over seeds (an entry that exists, with its flags), ordered by rate,
  a limit below the range lowest and a saturated one above an unsaturated one at the same rate.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from pdserve_tools.bench.serve_metrics import RequestTrace, summarize
from pdserve_tools.slo import Slo


@dataclass(frozen=True, slots=True)
class Point:
    rate_rps: float
    attainment: float


@dataclass(frozen=True, slots=True)
class Goodput:
    rate_rps: float | None  # the highest rate keeping `target` of requests in the SLO; None: below the range
    saturated: bool = False  # every rate run kept it: the limit is at least rate_rps

    def to_json(self) -> dict[str, object]:
        return {"rate_rps": self.rate_rps, "saturated": self.saturated}


def max_rate(points: Sequence[Point], target: float) -> Goodput:
    if not points:
        raise ValueError("an attainment curve needs at least one point")
    if not 0 < target <= 1:
        raise ValueError(f"the target share must lie in (0, 1], got {target}")
    curve = sorted(points, key=lambda p: p.rate_rps)
    last_good: Point | None = None
    for point in curve:
        if point.attainment < target:
            if last_good is None:
                return Goodput(None)
            # where the straight line between the two crosses the target
            share = (last_good.attainment - target) / (last_good.attainment - point.attainment)
            return Goodput(last_good.rate_rps + share * (point.rate_rps - last_good.rate_rps))
        last_good = point
    return Goodput(curve[-1].rate_rps, saturated=True)


def attainment(traces: Sequence[RequestTrace], slo: Slo) -> float:
    if not traces:
        raise ValueError("a run without requests has no attainment")
    return summarize(traces, slo=slo).slo_attainment or 0.0


async def climb(run: Callable[[float], Awaitable[Sequence[RequestTrace]]], slos: Mapping[str, Slo],
                rates: Sequence[float], target: float) -> dict[str, list[Point]]:
    if not slos:
        raise ValueError("climb needs at least one SLO")
    if not rates or any(not 0 < r < float("inf") for r in rates):
        raise ValueError(f"climb needs finite positive rates, got {list(rates)}")
    points: dict[str, list[Point]] = {name: [] for name in slos}
    for rate in sorted(rates):
        traces = await run(rate)
        for name, slo in slos.items():
            points[name].append(Point(rate, attainment(traces, slo)))
        if all(p[-1].attainment < target for p in points.values()):
            break
    return points


def median_goodput(results: Sequence[Goodput]) -> Goodput:
    if not results:
        raise ValueError("no results to take the median of")
    ordered = sorted(results, key=lambda g: (-1.0 if g.rate_rps is None else g.rate_rps, g.saturated))
    return ordered[(len(ordered) - 1) // 2]
