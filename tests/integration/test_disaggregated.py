"""Disaggregated serving of the tiny model: prefill and decode pools, KV streamed between them, exactly.

Each layout is one deployment for the whole module: 1P1D over the tcp transport, with conditional
disaggregation (a 1-token prompt runs whole on the decode instance), and 2P2D with the default transport, auto
(shared memory here, every worker being on this one node), where every prompt is disaggregated. Every test
checks behaviour a client sees (tokens, finish reasons, timings) or what the engines report (free KV blocks,
receive buffers).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import pytest

from pdserve_client import AsyncClient, Cancelled, Client
from tests.conftest import start_deployment, stop_deployment
from tests.integration.conftest import LENGTHS, MAX_TOKENS, assert_nothing_held, complete_greedy, prompts

pytestmark = pytest.mark.integration

LAYOUTS = {"1P1D-tcp": (1, 1, "tcp", 2), "2P2D-auto": (2, 2, "auto", 0)}  # ..., min_prompt_tokens


@pytest.fixture(scope="module", params=list(LAYOUTS))
def disagg(request, tiny_model):
    prefill, decode, transport, min_prompt = LAYOUTS[request.param]
    dep = start_deployment(
        tiny_model,
        {"mode": "disaggregated", "prefill": {"instances": prefill}, "decode": {"instances": decode}},
        router={"policy": "round_robin"},
        transfer={"transport": transport, "min_prompt_tokens": min_prompt},
    )
    dep.layout = (prefill, decode)
    yield dep
    stop_deployment(dep)


@pytest.mark.parametrize("index", range(len(LENGTHS)), ids=[f"prompt{n}" for n in LENGTHS])
def test_greedy_tokens_equal_plain_vllm(disagg, reference, index):
    ids = prompts()[index]
    done = complete_greedy(disagg.target, index)
    expected_ids, expected_reason = reference.single[index]
    assert done.token_ids == expected_ids
    assert done.final.finish_reason == expected_reason
    assert done.final.decode_instance.startswith("decode-")
    if len(ids) < disagg.router.handoff.min_prompt_tokens:  # ran whole on the decode instance
        assert done.final.prefill_instance == done.final.decode_instance
    else:
        assert done.final.prefill_instance.startswith("prefill-")


def test_every_instance_serves(disagg):
    with Client(disagg.target) as client:
        finals = [client.complete([5, 6, 7, i], max_tokens=3, temperature=0.0, ignore_eos=True).final
                  for i in range(4)]
    prefill, decode = disagg.layout
    assert len({f.prefill_instance for f in finals}) == prefill
    assert len({f.decode_instance for f in finals}) == decode


def test_engine_processes_hand_the_interpreter_to_kv_threads_quickly(disagg):
    """Each worker's model-runner process runs with the connector's short switch interval, not Python's 5 ms."""
    from kv_transfer.connector import SWITCH_INTERVAL_S

    instances = disagg.router.registry.all()

    async def states() -> list[dict[str, int]]:
        return list(await asyncio.gather(*(i.handle.kv_state.remote() for i in instances)))

    states = disagg.loop.run(states())
    assert [s["switch_interval_us"] for s in states] == [round(SWITCH_INTERVAL_S * 1e6)] * len(instances)


def test_first_token_arrives_before_the_decode_stream(disagg):
    with Client(disagg.target) as client:
        chunks = list(client.generate(prompts()[5], max_tokens=6, temperature=0.0, ignore_eos=True))
    assert len(chunks[0].token_ids) == 1  # the prefill's token, streamed on its own
    t = chunks[-1].final.timings
    assert t.prefill_compute > 0 and 0 < t.time_to_first_token < t.end_to_end
    assert t.kv_transfer >= 0 and t.first_decode_step > 0
    phases = (t.router_queue + t.prefill_queue + t.prefill_compute + t.kv_transfer + t.decode_queue
              + t.first_decode_step + t.decode)
    assert phases == pytest.approx(t.end_to_end, abs=0.05)
    registry = disagg.router.metrics.registry
    assert registry.get_sample_value("pdserve_kv_transfers_total", {"result": "ok"}) >= 1
    assert registry.get_sample_value("pdserve_kv_transfer_bytes_total") > 0


def test_one_token_requests_end_at_the_prefill(disagg, reference):
    with Client(disagg.target) as client:
        done = client.complete(prompts()[3], max_tokens=1, temperature=0.0)
    assert done.token_ids == reference.single[3][0][:1]
    assert done.final.finish_reason == "length"
    assert_nothing_held(disagg)


def test_split_policy_sooner_runs_a_leg_whole_where_the_decode_instance_is_sooner(disagg, reference):
    """`router.split_policy: sooner`: with prompt tokens queued on every prefill instance and none on the decode
    instances, a request runs whole on its decode instance, with plain vLLM's tokens; with the prefill pool idle,
    it is split as before."""
    d = disagg.router.legs.disaggregated
    prefills = [i for i in disagg.router.registry.all() if i.role == "prefill"]
    registry = disagg.router.metrics.registry

    def legs() -> tuple[float, float]:
        def count(path: str) -> float:
            return registry.get_sample_value("pdserve_legs_total", {"path": path}) or 0.0

        return count("whole"), count("split")

    async def set_split(policy: str, queued: int) -> None:  # on the router's loop, which owns this state
        d.handoff = dataclasses.replace(d.handoff, split_policy=policy)
        for p in prefills:
            p.queued_prefill_tokens += queued

    index = 5  # long enough to be disaggregated in every layout
    whole, split = legs()
    disagg.loop.run(set_split("sooner", 10_000))
    try:
        busy = complete_greedy(disagg.target, index)
    finally:
        disagg.loop.run(set_split("sooner", -10_000))
    try:
        idle = complete_greedy(disagg.target, index)
    finally:
        disagg.loop.run(set_split("always", 0))
    for done in (busy, idle):
        assert (done.token_ids, done.final.finish_reason) == reference.single[index]
    assert busy.final.prefill_instance == busy.final.decode_instance
    assert idle.final.prefill_instance.startswith("prefill-")
    assert legs() == (whole + 1, split + 1)


def test_vllm_cpu_is_batch_invariant_here(reference):
    # The concurrent test below relies on it: the same prompts batched together give the same tokens.
    assert reference.batched == reference.single


def test_concurrent_requests_equal_plain_vllm(disagg, reference):
    async def run():
        async with AsyncClient(disagg.target) as client:
            return await asyncio.gather(*(
                client.complete(ids, max_tokens=MAX_TOKENS, temperature=0.0, timeout=300) for ids in prompts()
            ))

    done = disagg.loop.run(run())
    assert [(d.token_ids, d.final.finish_reason) for d in done] == reference.single


def test_blocks_return_to_baseline_after_random_cancels(disagg):
    """200 requests, a quarter cancelled: before the first token (queued or in prefill), right after it
    (transfer, decode queue) or later in the decode. Nothing stays held anywhere."""
    rng = random.Random(7)
    plan = [(rng.randrange(1, 300), rng.randrange(1, 12), rng.random() < 0.25, rng.randrange(0, 4))
            for _ in range(200)]

    async def one(client, sem, n, max_tokens, cancel, after):
        async with sem:
            ids = [rng.randrange(100, 49_000) for _ in range(n)]
            stream = client.generate(ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, timeout=120)
            if cancel and after == 0:  # before any token: queued, in prefill, or not even arrived
                stream.cancel()
                return "cancelled"
            seen = 0
            async for _ in stream:
                seen += 1
                if cancel and seen >= after:  # 1: right after the prefill's token; later: mid-decode
                    stream.cancel()
                    return "cancelled"
            return "done"

    async def run():
        sem = asyncio.Semaphore(8)
        async with AsyncClient(disagg.target) as client:
            return await asyncio.gather(*(one(client, sem, *p) for p in plan), return_exceptions=True)

    outcomes = disagg.loop.run(run())
    errors = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, Cancelled)]
    assert not errors
    assert outcomes.count("done") >= 140
    assert_nothing_held(disagg)


def test_a_transfer_that_never_comes_falls_back_to_recompute(disagg, reference):
    """A decode request whose KV never arrives (a stalled peer) waits out the transfer deadline, then the engine
    recomputes the prompt: the output is still exact and nothing stays held."""
    from kv_transfer.params import RecvSpec, to_params
    from router.request import SamplingSpec

    ids = prompts()[4]
    expected = reference.single[4][0]
    decode = next(i for i in disagg.router.registry.all() if i.role == "decode")
    spec = RecvSpec("never-sent", "prefill-0", len(ids), time.time() + 2.0)
    sampling = SamplingSpec(max_tokens=MAX_TOKENS - 1, temperature=0.0)

    async def run():
        tokens = []
        async for ref in decode.handle.generate.remote("stall-1", ids + expected[:1], sampling, to_params(spec)):
            chunk = await ref
            tokens += chunk.token_ids
            last = chunk
        return tokens, last

    tokens, last = disagg.loop.run(run())
    assert expected[:1] + tokens == expected
    assert last.transfer is None or not last.transfer["ok"]
    assert_nothing_held(disagg)
