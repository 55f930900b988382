"""`pdserve chaos`: a deployment under load while workers die and KV transfers fail; nothing may be lost or leaked.

`run_chaos(deployment, ChaosConfig)` sends `requests` generations over gRPC, `concurrency` at a time; a share of
them (`cancel_fraction`) is cancelled at a random moment (before the first token, or after a random number of
tokens). Once the first request has ended, and then every `kill_every_s` seconds, one worker is killed (decode,
then prefill, alternately; only while another instance is healthy, which finishes the victim's requests: in 1P1D
the prefill instance decodes whole): Ray restarts it and the supervisor puts it back. Transfer faults come from
`transfer.fault_every` in the deployment's config (see `kv_transfer.sender`).

Every request ends one way: completed (its last message carries the finish reason), cancelled (by us), rejected
(RESOURCE_EXHAUSTED, with its retry hint) or failed (any other status code). One that has not ended by
`deadline_s` is lost. Afterwards, once the pool has healed, `held` counts what the surviving engines still hold:
requests, KV blocks, sends in progress, receive-buffer bytes, and the router's receive budget. The goal is 0
lost and 0 held. The integration tests call the same functions with small numbers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from common.errors import RETRY_AFTER_METADATA

DECODE, PREFILL = "decode", "prefill"


@dataclass(frozen=True)
class ChaosConfig:
    requests: int = 1000
    concurrency: int = 16
    cancel_fraction: float = 0.25
    kill_every_s: float = 60.0  # 0: no worker is killed
    prompt_tokens: tuple[int, int] = (8, 300)  # drawn uniformly in [low, high]
    max_tokens: tuple[int, int] = (4, 64)
    request_timeout_s: float = 300.0
    deadline_s: float = 3600.0  # every request must have ended by then, counted from the start
    heal_timeout_s: float = 300.0  # how long the pool may take to be whole again before `held` counts
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests < 1 or self.concurrency < 1:
            raise ValueError(f"chaos needs requests and concurrency >= 1, got {self.requests}, {self.concurrency}")
        if not 0 <= self.cancel_fraction <= 1:
            raise ValueError(f"cancel_fraction must be in [0, 1], got {self.cancel_fraction}")
        for lo, hi in (self.prompt_tokens, self.max_tokens):
            if not 1 <= lo <= hi:
                raise ValueError(f"a length range needs 1 <= low <= high, got ({lo}, {hi})")


@dataclass(frozen=True, slots=True)
class Plan:
    """One request to send: its prompt, its length, and when (if ever) its client cancels it."""

    prompt: tuple[int, ...]
    max_tokens: int
    cancel_after_tokens: int = -1  # -1: never; 0: before the first token, `cancel_delay_s` after sending
    cancel_delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Result:
    kind: str  # "completed", "cancelled", "rejected" or "failed"
    code: str = ""  # the gRPC status of a rejected or failed request
    retry_after_ms: str | None = None  # the hint a rejection carried
    sent: float = 0.0  # time.monotonic()
    first_token: float = 0.0  # 0: none came
    ended: float = 0.0
    tokens: int = 0


def plans(config: ChaosConfig) -> list[Plan]:
    rng = random.Random(config.seed)
    out = []
    for _ in range(config.requests):
        prompt = tuple(rng.randrange(100, 40_000) for _ in range(rng.randint(*config.prompt_tokens)))
        max_tokens = rng.randint(*config.max_tokens)
        if rng.random() >= config.cancel_fraction:
            out.append(Plan(prompt, max_tokens))
        elif rng.random() < 1 / 3:  # a third before the first token, the rest mid-stream
            out.append(Plan(prompt, max_tokens, 0, rng.uniform(0.0, 0.5)))
        else:
            out.append(Plan(prompt, max_tokens, rng.randint(1, max(1, max_tokens - 1))))
    return out


async def send(stub: Any, plan: Plan, timeout: float) -> Result:
    """Streams one request through `stub` (a `pdserve.v1.Generation` stub on an aio channel) and says how it
    ended. Never raises for the request's own outcome."""
    from pdserve_client.v1 import pdserve_pb2 as pb

    msg = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=plan.max_tokens, temperature=0.0, ignore_eos=True))
    msg.prompt_token_ids.ids.extend(plan.prompt)
    sent = time.monotonic()
    call = stub.Generate(msg, timeout=timeout)
    ours = False
    first, tokens = 0.0, 0

    def cancel() -> None:
        nonlocal ours
        ours = call.cancel() or ours

    timer = (
        asyncio.get_running_loop().call_later(plan.cancel_delay_s, cancel) if plan.cancel_after_tokens == 0 else None
    )
    try:
        async for reply in call:
            if reply.token_ids:
                first = first or time.monotonic()
                tokens += len(reply.token_ids)
            if reply.HasField("final"):
                return Result("completed", sent=sent, first_token=first, ended=time.monotonic(), tokens=tokens)
            if 0 < plan.cancel_after_tokens <= tokens:
                cancel()
                break
        if not ours:
            return Result("failed", "NO_FINAL_MESSAGE", sent=sent, first_token=first, ended=time.monotonic())
    except grpc.aio.AioRpcError as e:
        if not (ours and e.code() == grpc.StatusCode.CANCELLED):
            return _refused(e, sent, first, tokens)
    except asyncio.CancelledError:
        if not ours:
            raise  # the driver gave up on this request: it is lost, not cancelled
    finally:
        if timer is not None:
            timer.cancel()
    return Result("cancelled", sent=sent, first_token=first, ended=time.monotonic(), tokens=tokens)


def _refused(e: grpc.aio.AioRpcError, sent: float, first: float, tokens: int) -> Result:
    code = e.code().name
    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        hint = dict(e.trailing_metadata() or ()).get(RETRY_AFTER_METADATA)
        return Result("rejected", code, None if hint is None else str(hint), sent, first, time.monotonic(), tokens)
    return Result("failed", code, None, sent, first, time.monotonic(), tokens)


@dataclass
class Tally:
    """What happened to the requests sent so far."""

    sent: int = 0
    completed: int = 0
    cancelled: int = 0
    rejected: int = 0
    rejected_without_hint: int = 0
    failed: Counter[str] = field(default_factory=Counter)

    def add(self, r: Result) -> None:
        if r.kind == "completed":
            self.completed += 1
        elif r.kind == "cancelled":
            self.cancelled += 1
        elif r.kind == "rejected":
            self.rejected += 1
            self.rejected_without_hint += r.retry_after_ms is None
        else:
            self.failed[r.code] += 1

    @property
    def accepted(self) -> int:
        return self.sent - self.rejected

    @property
    def lost(self) -> int:
        """Accepted, and neither completed, cancelled nor failed with a status code."""
        return self.accepted - self.completed - self.cancelled - sum(self.failed.values())


async def drive(target: str, todo: list[Plan], config: ChaosConfig, on_result: Callable[[Result], None]) -> Tally:
    """Sends every plan, `config.concurrency` at a time, until all have ended or `config.deadline_s` passed."""
    from pdserve_client.v1 import pdserve_pb2_grpc as pb_grpc

    tally = Tally()
    queue = iter(todo)

    async def worker(stub: Any) -> None:
        for plan in queue:
            tally.sent += 1
            result = await send(stub, plan, config.request_timeout_s)
            tally.add(result)
            on_result(result)

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        workers = [asyncio.create_task(worker(stub)) for _ in range(config.concurrency)]
        _, late = await asyncio.wait(workers, timeout=config.deadline_s)
        for task in late:  # their requests in flight stay unaccounted: lost
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return tally


@dataclass
class Killer:
    """Kills a worker as soon as the first request has ended (`started` is set), so that every run with more
    requests than that loses one mid-load however fast it goes, then every `every_s` seconds; decode and prefill
    alternately."""

    router: Any
    every_s: float
    started: asyncio.Event = field(default_factory=asyncio.Event)
    kills: list[str] = field(default_factory=list)

    async def run(self) -> None:
        import ray

        role = DECODE
        await self.started.wait()
        while True:
            victim = pick_victim(self.router.registry.all(), role)
            if victim is not None:
                ray.kill(victim.handle, no_restart=False)  # Ray restarts it; the supervisor rejoins it
                self.kills.append(victim.instance_id)
            role = PREFILL if role == DECODE else DECODE
            await asyncio.sleep(self.every_s)  # the kill schedule, not a synchronization


def pick_victim(instances: list[Any], role: str) -> Any:
    """A healthy instance of `role` to kill, only while another instance of any role is healthy (every instance
    can run a request whole; with none left the requests would fail rather than resume)."""
    healthy = [i for i in instances if i.healthy]
    victims = [i for i in healthy if i.role == role]
    if not victims or len(healthy) < 2:
        return None
    return victims[0]


@dataclass(frozen=True)
class Held:
    """What surviving engines and the router still hold once the load has ended (all 0 when nothing leaked)."""

    requests: dict[str, int]  # running or waiting in the engine
    kv_blocks: dict[str, int]  # KV blocks in use (the engine's free blocks below its baseline)
    sends: dict[str, int]  # outgoing transfers in progress
    receive_bytes: dict[str, int]  # receive-buffer bytes stashed, plus loads still posted
    budget_bytes: dict[str, int]  # the router's receive budget still booked
    not_healthy: tuple[str, ...]  # instances that did not rejoin the pool

    @property
    def total(self) -> int:
        parts = (self.requests, self.kv_blocks, self.sends, self.receive_bytes, self.budget_bytes)
        return sum(sum(p.values()) for p in parts)


async def held(router: Any, idle_timeout_s: float = 60.0) -> Held:
    """Waits (up to `idle_timeout_s`) for every healthy engine to be idle, then counts what is still held."""
    await router.settle()
    live = [i for i in router.registry.all() if i.healthy]

    async def stats(instance: Any) -> Any:
        try:
            return await instance.handle.wait_idle.remote(idle_timeout_s)
        except Exception:  # not idle in time (or gone): what it reports now is the leak
            return await instance.handle.stats.remote()

    all_stats = await asyncio.gather(*(stats(i) for i in live))
    states = await asyncio.gather(*(i.handle.kv_state.remote() for i in live))
    budget = router.handoff.budget if router.handoff is not None else None
    return Held(
        requests={i.instance_id: s.running + s.waiting for i, s in zip(live, all_stats, strict=True)},
        kv_blocks={
            i.instance_id: math.ceil(s.kv_cache_usage * i.info.num_blocks) for i, s in zip(live, all_stats, strict=True)
        },
        sends={i.instance_id: int(st.get("outgoing", 0)) for i, st in zip(live, states, strict=True)},
        receive_bytes={
            i.instance_id: int(st.get("stashed_bytes", 0)) + int(st.get("pending_loads", 0))
            for i, st in zip(live, states, strict=True)
        },
        budget_bytes={i.instance_id: budget.used(i.instance_id) for i in router.registry.all()} if budget else {},
        not_healthy=tuple(i.instance_id for i in router.registry.all() if not i.healthy),
    )


async def heal(router: Any, timeout: float) -> None:
    """Returns once every instance is back in the pool, or after `timeout` (the report names those still out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(i.healthy for i in router.registry.all()):
        await asyncio.sleep(0.5)  # the supervisor rejoins restarted workers on its own heartbeat


@dataclass
class ChaosReport:
    config: ChaosConfig
    tally: Tally
    resumed: int
    transfers_failed: int
    kills: list[str]
    held: Held
    duration_s: float

    def rows(self) -> list[list[object]]:
        t, h = self.tally, self.held
        failed = ", ".join(f"{code} {n}" for code, n in sorted(t.failed.items())) or "0"
        return [
            ["sent", t.sent],
            ["accepted", t.accepted],
            ["completed", t.completed],
            ["cancelled", t.cancelled],
            ["rejected (RESOURCE_EXHAUSTED)", t.rejected],
            ["resumed", self.resumed],
            ["failed", failed],
            ["lost", t.lost],
            ["workers killed", len(self.kills)],
            ["transfers failed (recomputed)", self.transfers_failed],
            ["leaked KV blocks", sum(h.kv_blocks.values())],
            ["requests left in engines", sum(h.requests.values())],
            ["sends in progress", sum(h.sends.values())],
            ["receive buffer bytes", sum(h.receive_bytes.values())],
            ["receive budget bytes", sum(h.budget_bytes.values())],
            ["instances not back", ", ".join(h.not_healthy) or "none"],
            ["duration s", f"{self.duration_s:.1f}"],
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "tally": {**dataclasses.asdict(self.tally), "accepted": self.tally.accepted, "lost": self.tally.lost},
            "resumed": self.resumed,
            "transfers_failed": self.transfers_failed,
            "kills": self.kills,
            "held": {**dataclasses.asdict(self.held), "total": self.held.total},
            "duration_s": self.duration_s,
        }


async def run_chaos(
    deployment: Any, config: ChaosConfig, on_result: Callable[[Result], None] | None = None
) -> ChaosReport:
    """Runs the load, the kills and the count on `deployment` (call from its router's event loop)."""
    router = deployment.router
    metrics = router.metrics
    resumed0 = metrics.resumed._value.get()
    failed0 = metrics.kv_transfers.labels("failed")._value.get()
    killer = Killer(router, config.kill_every_s)
    kills = asyncio.create_task(killer.run()) if config.kill_every_s > 0 else None

    def ended(result: Result) -> None:
        killer.started.set()
        if on_result is not None:
            on_result(result)

    start = time.monotonic()
    try:
        tally = await drive(deployment.target, plans(config), config, ended)
    finally:
        if kills is not None:
            kills.cancel()
            await asyncio.gather(kills, return_exceptions=True)
    duration = time.monotonic() - start
    await heal(router, config.heal_timeout_s)
    return ChaosReport(
        config,
        tally,
        int(metrics.resumed._value.get() - resumed0),
        int(metrics.kv_transfers.labels("failed")._value.get() - failed0),
        killer.kills,
        await held(router),
        duration,
    )
