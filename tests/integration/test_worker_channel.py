"""The request channel between the router and a worker: who may call it, and what a dead worker does to a stream.

Two colocated instances: when the one running a request dies, the request resumes on the other from the prompt
plus the tokens already streamed, and the client's stream goes on without a gap or a repeat. A worker whose
process dies is restarted by Ray and put back into the pool by the supervisor.
"""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest
import ray

from common.channel import LENGTH
from pdserve_client import Client
from tests.conftest import start_deployment, stop_deployment

pytestmark = pytest.mark.integration

PROMPT, TOKENS = [11, 12, 13, 14, 15], 300


@pytest.fixture(scope="module")
def deployment(tiny_model):
    dep = start_deployment(tiny_model, {"mode": "colocated", "colocated": {"instances": 2}})
    yield dep
    stop_deployment(dep)


@pytest.fixture(scope="module")
def undisturbed(deployment):
    """PROMPT's greedy tokens while every worker is alive."""
    with Client(deployment.target) as client:
        return client.complete(PROMPT, max_tokens=TOKENS, temperature=0.0, ignore_eos=True).token_ids


def _raw_generate(address: str, answer: dict[str, object]) -> dict[str, object]:
    """The challenge answered with `answer`, then one `Generate` call, on a plain socket; the worker's answer."""
    call = {"id": "raw-1", "prompt": [11, 12, 13],
            "sampling": {"max_tokens": 2, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None,
                         "ignore_eos": True, "stop_token_ids": []}, "kv": None}
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        reader = sock.makefile("rb")

        def read() -> dict[str, object]:
            (n,) = LENGTH.unpack(reader.read(LENGTH.size))
            return json.loads(reader.read(n))

        assert "nonce" in read()
        for message in (answer, {"method": "Generate", "call": call}):
            body = json.dumps(message).encode()
            sock.sendall(LENGTH.pack(len(body)) + body)
        return read()


def test_a_worker_serves_only_callers_holding_the_cluster_secret(deployment):
    address = deployment.router.registry.all()[1].info.request_address
    for answer in ({}, {"secret": "not-the-secret"}, {"proof": "00" * 32}):
        answer = _raw_generate(address, answer)
        assert answer["error"]["code"] == "UNAUTHENTICATED"
        assert "cluster secret" in answer["error"]["message"]
    with Client(deployment.target) as client:  # the worker still serves the router
        assert len(client.complete([11, 12, 13], max_tokens=3, temperature=0.0, ignore_eos=True).token_ids) == 3


def test_a_request_resumes_on_another_instance_when_its_worker_dies(deployment, undisturbed):
    with Client(deployment.target) as client:
        chunks = iter(client.generate(PROMPT, max_tokens=TOKENS, temperature=0.0, ignore_eos=True, timeout=120))
        got = list(next(chunks).token_ids)  # the request is running on one instance
        (serving,) = [i for i in deployment.router.registry.all() if i.outstanding == 1]
        ray.kill(serving.handle)
        for chunk in chunks:
            got += chunk.token_ids
            final = chunk.final
        assert got == undisturbed
        assert final.completion_tokens == TOKENS and final.decode_instance != serving.instance_id
        assert not serving.healthy  # the dead instance left the pool: the next request goes to the survivor
        assert client.complete(PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True).token_ids == undisturbed[:8]

    assert deployment.router.metrics.resumed._value.get() == 1
    assert all(i.outstanding == 0 for i in deployment.router.registry.all())


def test_a_worker_whose_process_dies_is_restarted_and_rejoins_the_pool(deployment, undisturbed):
    (survivor,) = [i for i in deployment.router.registry.all() if i.healthy]
    before = survivor.info.request_address
    os.kill(ray.get(survivor.handle.pid.remote()), signal.SIGKILL)
    supervisor = deployment.supervisor
    deployment.loop.run(supervisor.wait(survivor.instance_id, healthy=False, timeout=30))  # missed heartbeat
    deployment.loop.run(supervisor.wait(survivor.instance_id, healthy=True, timeout=300))  # Ray restarted it
    assert survivor.info.request_address != before
    with Client(deployment.target) as client:
        done = client.complete(PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True)
    assert done.final.decode_instance == survivor.instance_id
    assert done.token_ids == undisturbed[:8]
