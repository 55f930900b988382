"""pdserve serving the tiny model over gRPC: streaming, text, chat, placement, server info, cancellation."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdserve_client import AsyncClient, Cancelled, Client, DeadlineExceeded, InvalidArgument

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(deployment):
    with Client(deployment.target) as c:
        yield c


def workers(deployment):
    return [i.handle for i in deployment.router.registry.all()]


def assert_engines_idle(deployment):
    """Every engine reports no running or waiting request and all KV blocks free (event-driven, bounded)."""
    for stats in ray.get([h.wait_idle.remote(30.0) for h in workers(deployment)]):
        assert (stats.running, stats.waiting, stats.kv_cache_usage) == (0, 0, 0.0)


def test_stream_ends_with_usage_and_timings(client):
    chunks = list(client.generate([11, 12, 13, 14], max_tokens=12, temperature=0.0, ignore_eos=True))
    final = chunks[-1].final
    assert final is not None and all(c.final is None for c in chunks[:-1])
    assert sum(len(c.token_ids) for c in chunks) == final.completion_tokens == 12
    assert final.prompt_tokens == 4 and final.finish_reason == "length"
    t = final.timings
    assert 0 < t.time_to_first_token <= t.end_to_end
    assert t.router_queue + t.prefill_queue + t.prefill_compute == pytest.approx(t.time_to_first_token, abs=1e-6)
    assert t.prefill_compute > 0 and t.decode > 0
    assert final.prefill_instance == final.decode_instance


def test_text_deltas_concatenate_to_the_decoded_tokens(client, deployment):
    done = client.complete("Once upon a time", max_tokens=40, temperature=0.0, ignore_eos=True)
    assert len(done.token_ids) == 40
    assert done.text == deployment.router.tokenizer.decode(done.token_ids)


def test_chat_prompts_use_the_chat_template(client, deployment):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    tok = deployment.router.tokenizer._tokenizer
    expected = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)
    done = client.complete(messages, max_tokens=3, temperature=0.0)
    assert done.final.prompt_tokens == len(expected)


def test_concurrent_requests_spread_over_instances(client):
    first = client.generate([5] * 8, max_tokens=60, temperature=0.0, ignore_eos=True)
    second = client.generate([6] * 8, max_tokens=60, temperature=0.0, ignore_eos=True)
    it1, it2 = iter(first), iter(second)
    next(it1), next(it2)  # both are running now
    a, b = [c for c in it1][-1].final, [c for c in it2][-1].final
    assert {a.decode_instance, b.decode_instance} == {"colocated-0", "colocated-1"}


def test_server_info_models_health_and_reflection(client, deployment):
    info = client.server_info()
    assert (info.mode, info.max_model_len, info.max_tokens_limit) == ("colocated", 1024, 512)
    assert info.decode_instances == 2 and info.default_model == "tiny-llama"
    assert client.list_models() == ["tiny-llama"]
    with grpc.insecure_channel(deployment.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="pdserve.v1.Generation"), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"pdserve.v1.Generation", "grpc.health.v1.Health"} <= names


def test_cancel_stops_the_request_in_the_engine(client, deployment):
    stream = client.generate([7] * 30, max_tokens=500, temperature=0.0, ignore_eos=True)
    it = iter(stream)
    next(it)
    next(it)
    running = sum(s.running for s in ray.get([h.stats.remote() for h in workers(deployment)]))
    assert running == 1
    stream.cancel()
    with pytest.raises(Cancelled):
        list(it)
    assert_engines_idle(deployment)


def test_deadline_exceeded_stops_the_request_in_the_engine(client, deployment):
    with pytest.raises(DeadlineExceeded):
        list(client.generate([8] * 30, max_tokens=500, temperature=0.0, ignore_eos=True, timeout=1.0))
    assert_engines_idle(deployment)
    # The server keeps serving.
    assert client.complete("still there?", max_tokens=2, temperature=0.0).final.completion_tokens == 2


def test_async_client_streams_and_cancels(deployment):
    async def scenario():
        async with AsyncClient(deployment.target) as client:
            done = await client.complete([9, 10], max_tokens=5, temperature=0.0, ignore_eos=True)
            assert len(done.token_ids) == 5
            stream = client.generate([9, 10], max_tokens=500, temperature=0.0, ignore_eos=True)
            seen = 0
            with pytest.raises(Cancelled):
                async for chunk in stream:
                    seen += len(chunk.token_ids)
                    if seen >= 3:
                        stream.cancel()
            assert seen < 500

    asyncio.run(scenario())
    assert_engines_idle(deployment)


def scrape(deployment) -> dict[tuple[str, tuple], float]:
    """The router's /metrics over HTTP, as {(sample name, labels): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{deployment.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_outcomes_tokens_and_latencies(client, deployment):
    before = scrape(deployment)
    client.complete([21, 22, 23], max_tokens=6, temperature=0.0, ignore_eos=True)
    with pytest.raises(InvalidArgument):
        list(client.generate("", max_tokens=4))
    after = scrape(deployment)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("pdserve_requests_total", outcome="length") == 1
    assert delta("pdserve_requests_total", outcome="INVALID_ARGUMENT") == 1
    assert delta("pdserve_generation_tokens_total") == 6
    assert delta("pdserve_prompt_tokens_total") == 3
    assert delta("pdserve_time_to_first_token_seconds_count") == 1
    assert delta("pdserve_time_per_output_token_seconds_count") == 1
    assert delta("pdserve_request_phase_seconds_count", phase="prefill_compute") == 1
    assert after[("pdserve_requests_running", ())] == 0
