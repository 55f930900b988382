"""Workers die under load (1P2D, the tiny model): every accepted request still ends complete and exact.

First `pdserve chaos`'s own run, small: 48 requests, 8 at a time, a quarter cancelled at random moments, a worker
killed (and restarted by Ray, rejoined by the supervisor) every few seconds, every 5th KV transfer failing on
purpose (dropped connection, stalled peer). No request may be lost, and once the pool has healed nothing may be
held.

While requests stream, a decode worker is killed: its requests resume on the other decode instance (a new
prefill over the prompt plus the tokens already streamed, its KV sent to the survivor), and each client's
stream goes on with no token missing or repeated. Then the prefill worker is killed: requests whose prefill
fails on it run whole on the surviving decode instance. Afterwards the surviving engines hold no request, no
KV block, no receive buffer.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import ray

from pdserve_client import AsyncClient, Client
from pdserve_tools.chaos import ChaosConfig, run_chaos
from tests.conftest import start_deployment, stop_deployment
from tests.integration.conftest import assert_nothing_held

pytestmark = pytest.mark.integration

TOKENS = 120


@pytest.fixture(scope="module")
def deployment(tiny_model):
    one_p_two_d = {"mode": "disaggregated", "prefill": {"instances": 1}, "decode": {"instances": 2}}
    dep = start_deployment(tiny_model, one_p_two_d,
                           router={"policy": "round_robin"},
                           # Injected stalls wait out the transfer deadline, so it is short here.
                           transfer={"transport": "tcp", "fault_every": 5, "deadline_s": 3.0})
    yield dep
    stop_deployment(dep)


def test_chaos_run_loses_no_request_and_leaks_nothing(deployment):
    config = ChaosConfig(requests=48, concurrency=8, kill_every_s=6.0, max_tokens=(4, 48), seed=3,
                         deadline_s=300.0, heal_timeout_s=300.0)
    report = deployment.loop.run(run_chaos(deployment, config))
    t = report.tally
    assert t.sent == t.accepted == 48 and t.rejected == 0
    assert t.lost == 0, report.rows()
    assert t.cancelled > 0 and t.completed > 0
    assert not t.failed, t.failed  # a lost worker's requests resume; none fails
    assert report.kills and report.transfers_failed > 0
    assert report.held.total == 0 and not report.held.not_healthy, report.held


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49_000) for _ in range(rng.randrange(8, 300))] for _ in range(count)]


def _undisturbed(target: str, prompts: list[list[int]]) -> list[list[int]]:
    with Client(target) as client:
        return [client.complete(p, max_tokens=TOKENS, temperature=0.0, ignore_eos=True).token_ids for p in prompts]


def _instance(dep, instance_id: str):
    return dep.router.registry.get(instance_id)


async def _stream_all(target: str, prompts: list[list[int]], kill) -> list[tuple[list[int], object]]:
    """Streams every prompt at once; once each has its first token, calls `kill()`; returns tokens and finals."""
    started = [asyncio.Event() for _ in prompts]

    async def one(client: AsyncClient, i: int) -> tuple[list[int], object]:
        tokens: list[int] = []
        final = None
        async for chunk in client.generate(prompts[i], max_tokens=TOKENS, temperature=0.0, ignore_eos=True,
                                           timeout=180):
            tokens += chunk.token_ids
            final = chunk.final or final
            started[i].set()
        return tokens, final

    async with AsyncClient(target) as client:
        tasks = [asyncio.create_task(one(client, i)) for i in range(len(prompts))]
        await asyncio.gather(*(e.wait() for e in started))
        kill()
        return await asyncio.gather(*tasks)


def test_killing_a_decode_worker_mid_stream_loses_no_request(deployment):
    prompts = _prompts(6, seed=7)
    expected = _undisturbed(deployment.target, prompts)
    victim = _instance(deployment, "decode-0")
    results = asyncio.run(_stream_all(deployment.target, prompts, lambda: ray.kill(victim.handle)))
    for (tokens, final), want in zip(results, expected, strict=True):
        assert tokens == want
        assert final.completion_tokens == TOKENS and final.decode_instance == "decode-1"
    assert not victim.healthy
    assert deployment.router.metrics.resumed._value.get() >= 1  # round-robin put half the requests on decode-0
    assert_nothing_held(deployment)


def test_killing_the_prefill_worker_leaves_whole_requests_on_decode(deployment):
    prompts = _prompts(4, seed=8)
    expected = _undisturbed(deployment.target, prompts)
    victim = _instance(deployment, "prefill-0")
    resumed_before = deployment.router.metrics.resumed._value.get()
    ray.kill(victim.handle)
    with Client(deployment.target) as client:
        done = [client.complete(p, max_tokens=TOKENS, temperature=0.0, ignore_eos=True, timeout=180)
                for p in prompts]
    assert [d.token_ids for d in done] == expected
    # The first request found the prefill worker gone and resumed whole on decode; the rest never tried it.
    assert all(d.final.prefill_instance == d.final.decode_instance == "decode-1" for d in done)
    assert not victim.healthy
    assert deployment.router.metrics.resumed._value.get() == resumed_before + 1
    assert_nothing_held(deployment)
