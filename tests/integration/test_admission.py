"""Admission, retry hints and draining on a live 1P2D deployment of the tiny model.

The router runs at most two requests at once and queues none (`router.max_outstanding: 2`,
`router.admission_queue: 0`), so a third request is refused at once: gRPC RESOURCE_EXHAUSTED with the trailing
metadata `pdserve-retry-after-ms`, HTTP 429 with `Retry-After`. A prompt whose KV can never fit a decode
instance's receive buffer (1 MiB here) is INVALID_ARGUMENT / 400, not an overload. With `router.shed`, a request
whose first token is projected later than `router.slo.ttft_s` is refused the same way, before any engine sees it,
in this layout and in the colocated one. A decode instance drained
while a request streams on it finishes that request and takes no new one; then it leaves the deployment.
"""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from pdserve_client import Client
from pdserve_client.v1 import pdserve_pb2 as pb
from pdserve_client.v1 import pdserve_pb2_grpc as pb_grpc
from pdserve_tools.chaos import held
from router.placement.slo import Objectives
from tests.conftest import TINY_ENGINE, poll, start_deployment, stop_deployment

pytestmark = pytest.mark.integration

RETRY_AFTER_S = 1.5
LONG = 500  # tokens of a request that streams for a while


@pytest.fixture(scope="module")
def dep(tiny_model):
    d = start_deployment(
        tiny_model,
        {"mode": "disaggregated", "prefill": {"instances": 1}, "decode": {"instances": 2}},
        engine={"model": str(tiny_model), **TINY_ENGINE, "max_model_len": 2048, "max_num_batched_tokens": 2048},
        router={"max_outstanding": 2, "admission_queue": 0, "retry_after_s": RETRY_AFTER_S},
        transfer={"transport": "tcp", "receive_buffer_mib": 1},
    )
    yield d
    stop_deployment(d)


@pytest.fixture(scope="module")
def stub(dep):
    with grpc.insecure_channel(dep.target) as channel:
        yield pb_grpc.GenerationStub(channel)


def _request(tokens: int, max_tokens: int) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    msg.prompt_token_ids.ids.extend(range(1000, 1000 + tokens))
    return msg


def test_a_refused_request_carries_a_retry_hint_on_grpc_and_http(dep, stub):
    running = [stub.Generate(_request(16, LONG), timeout=120) for _ in range(2)]
    try:
        for call in running:
            assert next(call).token_ids  # admitted: its first token came
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.Generate(_request(16, 4), timeout=30))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at capacity" in refused.value.details()
        assert dict(refused.value.trailing_metadata())["pdserve-retry-after-ms"] == "1500"

        body = {"model": dep.router.limits.model_name, "prompt": [1, 2, 3], "max_tokens": 4}
        reply = httpx.post(f"http://127.0.0.1:{dep.http_port}/v1/completions", json=body, timeout=30)
        assert reply.status_code == 429
        assert reply.headers["Retry-After"] == "2"  # 1.5 s, rounded up to whole seconds
        assert reply.json()["error"]["type"] == "rate_limit_error"
        assert "at capacity" in reply.json()["error"]["message"]
    finally:
        for call in running:
            call.cancel()
    poll(lambda: dep.router.admission.running == 0, "the admitted requests to leave")
    assert dep.router.metrics.requests.labels("RESOURCE_EXHAUSTED")._value.get() == 2


def test_a_prompt_too_large_for_any_receive_buffer_is_invalid_not_overloaded(dep, stub):
    info = dep.router.registry.get("decode-0").info
    fits = (1 << 20) // info.kv_block_bytes * info.block_size
    assert fits + 1 + 4 <= info.max_model_len  # the prompt below is valid in every other respect
    with pytest.raises(grpc.RpcError) as refused:
        next(stub.Generate(_request(fits + 1, 4), timeout=60))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {fits} tokens fit" in refused.value.details()
    assert "pdserve-retry-after-ms" not in dict(refused.value.trailing_metadata())

    body = {"model": dep.router.limits.model_name, "prompt": list(range(1000, 1001 + fits)), "max_tokens": 4}
    reply = httpx.post(f"http://127.0.0.1:{dep.http_port}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 400
    assert "Retry-After" not in reply.headers
    assert f"at most {fits} tokens fit" in reply.json()["error"]["message"]


QUEUED = 10**7  # prompt tokens put on every instance's queue: far beyond any objective at any pace


def assert_shed_then_served(d) -> None:
    """With shedding on and a huge queue on every instance, gRPC and HTTP requests are refused with a retry hint,
    counted, and leave nothing held; with the queues back, the same request runs."""
    router, legs = d.router, d.router.legs
    with Client(d.target) as client:
        client.complete(list(range(1000, 1016)), max_tokens=2, temperature=0.0, timeout=120)  # a prefill pace

    async def objectives(o: Objectives, queued: int) -> None:  # on the router's loop, which owns this state
        legs.objectives = o
        for i in router.registry.all():
            i.queued_prefill_tokens += queued

    shed = router.metrics.shed._value.get()
    d.loop.run(objectives(Objectives(ttft_s=1.0, shed=True, retry_floor_s=0.25), QUEUED))
    try:
        with grpc.insecure_channel(d.target) as channel, pytest.raises(grpc.RpcError) as refused:
            list(pb_grpc.GenerationStub(channel).Generate(_request(16, 4), timeout=60))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the 1 s objective" in refused.value.details() and f"{QUEUED} prompt tokens" in refused.value.details()
        assert int(dict(refused.value.trailing_metadata())["pdserve-retry-after-ms"]) >= 250

        body = {"model": router.limits.model_name, "prompt": [1, 2, 3], "max_tokens": 4}
        reply = httpx.post(f"http://127.0.0.1:{d.http_port}/v1/completions", json=body, timeout=30)
        assert reply.status_code == 429 and int(reply.headers["Retry-After"]) >= 1
        assert "objective" in reply.json()["error"]["message"]
    finally:
        d.loop.run(objectives(Objectives(ttft_s=600.0, shed=True), -QUEUED))
    try:
        with Client(d.target) as client:
            done = client.complete(list(range(1000, 1016)), max_tokens=4, temperature=0.0, timeout=120)
        assert len(done.token_ids) == 4
    finally:
        d.loop.run(objectives(Objectives(), 0))
    assert router.metrics.shed._value.get() == shed + 2
    left = d.loop.run(held(router))
    assert left.total == 0 and not left.not_healthy, left


def test_a_request_projected_to_miss_its_ttft_objective_is_shed_before_it_runs(dep):
    assert_shed_then_served(dep)


def test_shedding_holds_in_the_colocated_layout_too(deployment):
    assert_shed_then_served(deployment)


def test_a_drained_instance_finishes_its_request_takes_no_new_one_and_leaves(dep, stub):
    registry = dep.router.registry
    stream = stub.Generate(_request(40, LONG), timeout=180)
    tokens = list(next(stream).token_ids)  # the prefill's first token; the decode leg starts next
    poll(lambda: any(i.outstanding for i in registry.all() if i.role == "decode"), "the decode leg")
    victim = next(i.instance_id for i in registry.all() if i.role == "decode" and i.outstanding)
    other = next(i.instance_id for i in registry.all() if i.role == "decode" and i.instance_id != victim)

    drained = asyncio.run_coroutine_threadsafe(dep.drain(victim, timeout=180, remove=True), dep.loop.loop)
    poll(lambda: registry.get(victim).draining, "the drain to begin")
    assert not drained.done()  # the request on the victim streams on (hundreds of tokens to go)
    with Client(dep.target) as client:
        later = [client.complete(list(range(2000 + k, 2030 + k)), max_tokens=8, temperature=0.0, timeout=60)
                 for k in range(4)]
    assert [c.final.decode_instance for c in later] == [other] * 4

    final = None
    for reply in stream:
        tokens += reply.token_ids
        final = reply.final if reply.HasField("final") else final
    assert len(tokens) == LONG and final is not None and final.decode_instance == victim
    drained.result(timeout=60)
    assert victim not in [i.instance_id for i in registry.all()]
    left = dep.loop.run(held(dep.router))
    assert left.total == 0 and not left.not_healthy, left
