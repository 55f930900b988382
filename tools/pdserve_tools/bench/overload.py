"""`pdserve bench overload`: three times the capacity, offered for minutes; the router must shed, not fall over.

1. Capacity: a closed loop of `--probe-concurrency` clients for `--probe-s` seconds; capacity is the rate of
   requests that completed within the SLO (TTFT and TPOT, measured at the client).
2. Overload: Poisson arrivals at `--factor` (3) times that rate for `--duration-s` (120) seconds. Admission
   (`router.max_outstanding`, `router.admission_queue`) lets some in and refuses the rest with
   RESOURCE_EXHAUSTED and a retry hint.

Reported: the router's resident memory at the start, peak and end of the overload (the router runs in this
process, beside the load generator: the figure includes the generator's requests in flight), the SLO attainment
of admitted requests, rejections and how many carried a retry hint, other failures, and whether every instance
was still in the pool and a request still completed afterwards ("no crash").

    pdserve bench overload [--duration-s 120] [--max-outstanding 16 --admission-queue 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

from pdserve_tools.chaos import ChaosConfig, Plan, Result, Tally, drive, plans, send
from pdserve_tools.slo import Slo, tpot


def within(slo: Slo, r: Result) -> bool:
    """A request that completed, streamed a first token and met every objective of `slo` (`Slo.met`)."""
    if r.kind != "completed" or not r.first_token:
        return False
    ttft, e2e = r.first_token - r.sent, r.ended - r.sent
    return slo.met(ttft, tpot(ttft, e2e, r.tokens), e2e)


def rss_bytes() -> int:
    """This process's resident memory (psutil when installed, else /proc)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssWatch:
    """Samples the resident memory every `period_s` until stopped: start, peak, end."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.start = self.peak = self.end = rss_bytes()
        self._period = period_s
        self._task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes())
            await asyncio.sleep(self._period)  # the sampling period

    def __enter__(self) -> RssWatch:
        self._task = asyncio.get_running_loop().create_task(self._watch())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.end = rss_bytes()
        self.peak = max(self.peak, self.end)


async def probe(target: str, chaos: ChaosConfig, seconds: float, slo: Slo) -> float:
    """Requests per second completing within the SLO, closed loop at `chaos.concurrency`."""
    results: list[Result] = []
    config = dataclasses.replace(chaos, deadline_s=seconds, cancel_fraction=0.0)
    start = time.monotonic()
    await drive(target, plans(config), config, results.append)
    return sum(within(slo, r) for r in results) / (time.monotonic() - start)


async def offer(target: str, todo: list[Plan], rate: float, timeout: float, seed: int) -> list[Result]:
    """Open loop: Poisson arrivals at `rate` per second, each request on its own task."""
    import grpc

    from pdserve_client.v1 import pdserve_pb2_grpc as pb_grpc

    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        tasks = []
        at = time.monotonic()
        for plan in todo:
            at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, at - time.monotonic()))  # the arrival schedule
            tasks.append(asyncio.create_task(send(stub, plan, timeout)))
        return list(await asyncio.gather(*tasks))


@dataclass
class OverloadReport:
    capacity_rps: float
    offered_rps: float
    duration_s: float
    tally: Tally
    admitted_slo_met: float
    rss: tuple[int, int, int]  # start, peak, end
    healthy_after: bool
    served_after: bool

    def rows(self) -> list[list[object]]:
        t, mib = self.tally, 2**20
        failed = ", ".join(f"{c} {n}" for c, n in sorted(t.failed.items())) or "0"
        return [
            ["capacity (req/s within SLO)", f"{self.capacity_rps:.2f}"],
            ["offered (req/s)", f"{self.offered_rps:.2f}"],
            ["duration s", f"{self.duration_s:.1f}"],
            ["sent", t.sent],
            ["admitted", t.accepted],
            ["completed", t.completed],
            ["admitted within SLO", f"{self.admitted_slo_met:.1%}"],
            ["rejected", t.rejected],
            ["rejections with a retry hint", t.rejected - t.rejected_without_hint],
            ["failed", failed],
            ["lost", t.lost],
            ["router RSS MiB start / peak / end", " / ".join(f"{b / mib:.0f}" for b in self.rss)],
            ["all instances healthy after", self.healthy_after],
            ["a request served after", self.served_after],
        ]


async def run_overload(dep: Any, args: argparse.Namespace) -> OverloadReport:
    slo = Slo(args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000)
    base = ChaosConfig(
        requests=2000,
        concurrency=args.probe_concurrency,
        cancel_fraction=0.0,
        kill_every_s=0,
        prompt_tokens=(8, 256),
        max_tokens=(8, 32),
        request_timeout_s=args.timeout,
        seed=args.seed,
    )
    capacity = await probe(dep.target, base, args.probe_s, slo)
    rate = max(0.1, capacity) * args.factor
    todo = plans(dataclasses.replace(base, requests=max(1, round(rate * args.duration_s)), seed=args.seed + 1))
    with RssWatch() as rss:
        start = time.monotonic()
        results = await offer(dep.target, todo, rate, args.timeout, args.seed)
        duration = time.monotonic() - start
    tally = Tally(sent=len(results))
    for r in results:
        tally.add(r)
    admitted = [r for r in results if r.kind != "rejected"]
    met = sum(within(slo, r) for r in admitted) / len(admitted) if admitted else 0.0
    after = await drive(dep.target, todo[:1], ChaosConfig(requests=1, concurrency=1, kill_every_s=0), lambda r: None)
    healthy = all(i.healthy for i in dep.router.registry.all())
    return OverloadReport(
        capacity, rate, duration, tally, met, (rss.start, rss.peak, rss.end), healthy, after.completed == 1
    )


def main(args: argparse.Namespace) -> int:
    from pdserve.cluster import deploy
    from pdserve_tools.bench.report import table, write_json
    from pdserve_tools.chaos_command import deployment_config

    router = {"max_outstanding": args.max_outstanding, "admission_queue": args.admission_queue, "max_tokens_limit": 512}
    config = deployment_config(args.config, {}, router)

    async def run() -> OverloadReport:
        dep = await deploy(config)
        try:
            return await run_overload(dep, args)
        finally:
            await dep.stop()

    print(f"probing capacity for {args.probe_s:g} s, then {args.factor:g}x for {args.duration_s:g} s", file=sys.stderr)
    report = asyncio.run(run())
    print(
        f"\nSLO: TTFT <= {args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms; admission: "
        f"{args.max_outstanding} running, {args.admission_queue} waiting"
    )
    print(table(["", "value"], report.rows()))
    out = {
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "report": {k: v for k, v in dataclasses.asdict(report).items() if k != "tally"},
        "tally": {**dataclasses.asdict(report.tally), "accepted": report.tally.accepted, "lost": report.tally.lost},
    }
    print(f"wrote {write_json(args.out, out)}")
    ok = report.healthy_after and report.served_after and report.tally.rejected_without_hint == 0
    return 0 if ok and report.tally.lost == 0 else 1


def add_parser(bsub: Any, func: Any) -> None:
    b = bsub.add_parser("overload", help="offer 3x the measured capacity; report shedding, retry hints, memory")
    b.add_argument(
        "--config",
        help="a serve config whose engine, workers and transfer sections to use (default: 1P2D of a tiny random model)",
    )
    b.add_argument("--duration-s", type=float, default=120.0)
    b.add_argument("--factor", type=float, default=3.0, help="offered load as a multiple of the capacity")
    b.add_argument("--probe-s", type=float, default=20.0, help="seconds of the capacity measurement")
    b.add_argument("--probe-concurrency", type=int, default=4)
    b.add_argument("--max-outstanding", type=int, default=16, help="router.max_outstanding during the run")
    b.add_argument("--admission-queue", type=int, default=16, help="router.admission_queue during the run")
    b.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    b.add_argument("--slo-tpot-ms", type=float, default=100.0)
    b.add_argument("--timeout", type=float, default=120.0, help="per-request deadline, seconds")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default="bench-results/overload.json")
    b.set_defaults(func=func)
