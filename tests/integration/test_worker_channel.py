"""The request channel between the router and a worker: who may call it, and what a dead worker does to a stream."""

from __future__ import annotations

import json

import grpc
import pytest
import ray
from pdserve_client import Client, Internal

from tests.conftest import start_deployment, stop_deployment

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def deployment(tiny_model):
    dep = start_deployment(tiny_model, {"mode": "colocated", "instances": 1})
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
    address = deployment.router.registry.all()[0].info.request_address
    for metadata in ((), (("pdserve-secret", "not-the-secret"),)):
        with pytest.raises(grpc.RpcError) as e:
            _raw_generate(address, metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "cluster secret" in e.value.details()
    with Client(deployment.target) as client:  # the worker still serves the router
        assert len(client.complete([11, 12, 13], max_tokens=3, temperature=0.0, ignore_eos=True).token_ids) == 3


def test_a_worker_that_dies_mid_stream_ends_the_request_with_an_error(deployment):
    instance = deployment.router.registry.all()[0]
    with Client(deployment.target) as client:
        stream = iter(client.generate([11, 12, 13], max_tokens=400, temperature=0.0, ignore_eos=True, timeout=120))
        assert next(stream).token_ids  # the request is running in the worker
        ray.kill(instance.handle)
        with pytest.raises(Internal) as e:
            for _ in stream:
                pass
    assert "the worker failed" in e.value.message
    assert instance.outstanding == 0
