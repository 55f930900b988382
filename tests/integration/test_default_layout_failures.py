"""The layout users start with (1P1D, the embedded default's shape) survives the death of either worker.

Six greedy streams are in flight when the decode worker's process is SIGKILLed: each resumes whole on the prefill
instance (the only instance left that can decode) from the prompt plus the tokens it already streamed, and ends
with exactly the tokens of an undisturbed run. Ray restarts the worker and the supervisor puts it back. Then the
prefill worker's process is killed with six streams in flight: they finish on the decode instance, and requests
sent while it is down run whole there. Afterwards nothing is held anywhere.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import ray

from tests.conftest import start_deployment, stop_deployment
from tests.integration.conftest import assert_nothing_held
from tests.integration.test_chaos import TOKENS, _prompts, _stream_all, _undisturbed

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def deployment(tiny_model):
    dep = start_deployment(tiny_model, {"mode": "disaggregated", "prefill": {"instances": 1},
                                        "decode": {"instances": 1}})
    yield dep
    stop_deployment(dep)


def _sigkill(dep, instance_id: str):
    """A function that SIGKILLs the worker's process (as the OOM killer or a crash would), and its instance."""
    instance = dep.router.registry.get(instance_id)
    pid = ray.get(instance.handle.pid.remote())
    return (lambda: os.kill(pid, signal.SIGKILL)), instance


def test_the_decode_worker_dies_and_every_stream_finishes_on_the_prefill_instance(deployment):
    prompts = _prompts(6, seed=11)
    expected = _undisturbed(deployment.target, prompts)
    kill, victim = _sigkill(deployment, "decode-0")
    results = asyncio.run(_stream_all(deployment.target, prompts, kill))
    for (tokens, final), want in zip(results, expected, strict=True):
        assert tokens == want
        assert final.completion_tokens == TOKENS and final.decode_instance == "prefill-0"
    assert deployment.router.metrics.resumed._value.get() >= 6
    deployment.loop.run(deployment.supervisor.wait("decode-0", healthy=True, timeout=300))
    assert victim.healthy
    assert_nothing_held(deployment)


def test_the_prefill_worker_dies_and_streams_and_new_requests_finish_on_decode(deployment):
    deployment.loop.run(deployment.supervisor.wait("decode-0", healthy=True, timeout=300))
    prompts = _prompts(6, seed=12)
    expected = _undisturbed(deployment.target, prompts)
    kill, victim = _sigkill(deployment, "prefill-0")
    results = asyncio.run(_stream_all(deployment.target, prompts, kill))
    assert [tokens for tokens, _ in results] == expected
    assert all(final.decode_instance == "decode-0" for _, final in results)
    later = _undisturbed(deployment.target, prompts[:2])  # while the prefill worker is down or rejoining
    assert later == expected[:2]
    deployment.loop.run(deployment.supervisor.wait("prefill-0", healthy=True, timeout=300))
    assert victim.healthy
    assert_nothing_held(deployment)
