"""The request channel between the router and a worker: who may call it, and what a dead worker does to a stream.

Two colocated instances: when the one running a request dies, the request resumes on the other from the prompt
plus the tokens already streamed, and the client's stream goes on without a gap or a repeat.
"""

from __future__ import annotations

import json

import grpc
import pytest
import ray
from pdserve_client import Client

from tests.conftest import start_deployment, stop_deployment

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def deployment(tiny_model):
    dep = start_deployment(tiny_model, {"mode": "colocated", "instances": 2})
    yield dep
    stop_deployment(dep)


def _raw_generate(address: str, metadata: tuple[tuple[str, str], ...]) -> list[object]:
    from pdserve.channel import SERVICE

    call = {"id": "raw-1", "prompt": [11, 12, 13],
            "sampling": {"max_tokens": 2, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None,
                         "ignore_eos": True, "stop_token_ids": []}, "kv": None}
    with grpc.insecure_channel(address) as channel:
        generate = channel.unary_stream(f"/{SERVICE}/Generate", request_serializer=lambda m: json.dumps(m).encode(),
                                        response_deserializer=json.loads)
        return list(generate(call, metadata=metadata, timeout=60))


def test_a_worker_serves_only_callers_holding_the_cluster_secret(deployment):
    address = deployment.router.registry.all()[1].info.request_address
    for metadata in ((), (("pdserve-secret", "not-the-secret"),)):
        with pytest.raises(grpc.RpcError) as e:
            _raw_generate(address, metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "cluster secret" in e.value.details()
    with Client(deployment.target) as client:  # the worker still serves the router
        assert len(client.complete([11, 12, 13], max_tokens=3, temperature=0.0, ignore_eos=True).token_ids) == 3


def test_a_request_resumes_on_another_instance_when_its_worker_dies(deployment):
    prompt, n = [11, 12, 13, 14, 15], 300
    with Client(deployment.target) as client:
        expected = client.complete(prompt, max_tokens=n, temperature=0.0, ignore_eos=True).token_ids
        chunks = iter(client.generate(prompt, max_tokens=n, temperature=0.0, ignore_eos=True, timeout=120))
        got = list(next(chunks).token_ids)  # the request is running on one instance
        (serving,) = [i for i in deployment.router.registry.all() if i.outstanding == 1]
        ray.kill(serving.handle)
        for chunk in chunks:
            got += chunk.token_ids
            final = chunk.final
        assert got == expected
        assert final.completion_tokens == n and final.decode_instance != serving.instance_id
        assert not serving.healthy  # the dead instance left the pool: the next request goes to the survivor
        assert client.complete(prompt, max_tokens=8, temperature=0.0, ignore_eos=True).token_ids == expected[:8]
    assert deployment.router.metrics.resumed._value.get() == 1
    assert all(i.outstanding == 0 for i in deployment.router.registry.all())
