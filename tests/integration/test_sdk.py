"""Resuming a generation at the router, and the SDK resuming one across a restart of the gRPC frontend.

The contract: a request that carries `resume_token_ids` (the tokens its client already received) continues after
them, so with greedy sampling the resumed stream is exactly the tail of an undisturbed run, its text continues
the text already sent, and its usage counts the whole generation. The SDK's use of it: the router's gRPC
frontend is stopped under a running stream and started again on the same port; the SDK resends the request
with what it received and the caller sees the undisturbed run's tokens, none missing, none repeated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import grpc
import pytest

from pdserve_client import Client, PdserveError, Retry
from pdserve_client.v1 import pdserve_pb2 as pb
from pdserve_client.v1 import pdserve_pb2_grpc as pb_grpc
from router.grpc_server import start_grpc
from tests.integration.test_serving import assert_engines_idle

pytestmark = pytest.mark.integration

PROMPT = [11, 12, 13, 14, 15, 16, 17]


def request(
    max_tokens: int, resume: Sequence[int] = (), key: str = "", prompt: Sequence[int] = PROMPT
) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(request_id=key, resume_token_ids=resume)
    msg.prompt_token_ids.ids.extend(prompt)
    msg.sampling.max_tokens = max_tokens
    msg.sampling.temperature = 0.0
    msg.sampling.ignore_eos = True
    return msg


@pytest.fixture(scope="module")
def stub(deployment):
    with grpc.insecure_channel(deployment.target) as channel:
        yield pb_grpc.GenerationStub(channel)


def test_a_resumed_request_continues_exactly_after_the_received_tokens(stub, deployment):
    whole = list(stub.Generate(request(24), timeout=120))
    tokens = [t for m in whole for t in m.token_ids]
    assert len(tokens) == 24
    # Resume at a message boundary of the undisturbed run, so the text sent so far is known exactly.
    cut = next(i for i in range(1, len(whole)) if sum(len(m.token_ids) for m in whole[:i]) >= 5)
    received = [t for m in whole[:cut] for t in m.token_ids]
    sent_text = "".join(m.text for m in whole[:cut])

    rest = list(stub.Generate(request(24, received, key="resume-1"), timeout=120))
    assert [t for m in rest for t in m.token_ids] == tokens[len(received) :]
    assert sent_text + "".join(m.text for m in rest) == "".join(m.text for m in whole)
    assert {m.request_id for m in rest} == {"resume-1"}  # the client's key names the stream
    final = rest[-1].final
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(PROMPT), 24)
    assert final.finish_reason == pb.FINISH_REASON_LENGTH


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (request(4, [100, 101, 102, 103]), r"resume_token_ids holds 4 tokens.*fewer than sampling.max_tokens \(4\)"),
        (request(8, [100, 10**6]), r"resume_token_ids holds token id 1000000; token ids must be in \[0, "),
        (request(500, [100] * 424, prompt=[7] * 600), r"prompt \(600 tokens\) plus resume_token_ids \(424\) reach"),
        (request(4, key="no spaces please"), "request_id must be 1 to 128 characters"),
        (request(4, key="k" * 129), "request_id must be 1 to 128 characters"),
    ],
    ids=["all-received", "outside-vocabulary", "past-max-model-len", "bad-key", "long-key"],
)
def test_invalid_resumes_are_refused(stub, msg, message):
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Generate(msg, timeout=60))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, refused.value.details()), refused.value.details()


@pytest.fixture
def frontend(deployment):
    """A second gRPC frontend of the deployment's router, which a test may stop and start again."""
    server, port = deployment.loop.run(start_grpc(deployment.router, "127.0.0.1", 0))
    state = {"server": server, "port": port}
    yield state
    deployment.loop.run(state["server"].stop(0))


def test_the_sdk_resumes_across_a_frontend_restart(deployment, frontend):
    with Client(deployment.target) as client:
        undisturbed = client.complete(PROMPT, max_tokens=300, temperature=0.0, ignore_eos=True, timeout=300)
    assert len(undisturbed.token_ids) == 300

    async def restart() -> None:
        await frontend["server"].stop(0)  # every call on it ends (UNAVAILABLE); the router cancels its requests
        frontend["server"], _ = await start_grpc(deployment.router, "127.0.0.1", frontend["port"])

    retry = Retry(max_attempts=5, initial_backoff_s=0.05, max_backoff_s=0.5)
    received, texts = [], []
    with Client(f"127.0.0.1:{frontend['port']}", retry=retry) as client:
        stream = client.generate(PROMPT, max_tokens=300, temperature=0.0, ignore_eos=True, timeout=300)
        for chunk in stream:
            if not received:
                deployment.loop.run(restart())
            received += chunk.token_ids
            texts.append(chunk.text)
            final = chunk.final
    assert stream.resumes == 1
    assert received == undisturbed.token_ids
    assert "".join(texts) == undisturbed.text
    assert final.completion_tokens == 300 and final.prompt_tokens == len(PROMPT)
    assert_engines_idle(deployment)  # the broken stream's engine request was stopped, not left running
    assert all(i.outstanding == 0 for i in deployment.router.registry.all())


def test_a_resend_under_the_same_key_takes_over_the_running_stream(deployment, stub):
    with Client(deployment.target) as client:
        undisturbed = client.complete(PROMPT, max_tokens=200, temperature=0.0, ignore_eos=True, timeout=300)
        first = client.generate(PROMPT, max_tokens=200, temperature=0.0, ignore_eos=True, request_id="takeover-1")
        chunks = iter(first)
        received = list(next(chunks).token_ids)
        # The client resends under the same key with what it has (as after losing the first stream).
        rest = list(stub.Generate(request(200, received, key="takeover-1"), timeout=300))
        assert [t for m in rest for t in m.token_ids] == undisturbed.token_ids[len(received) :]
        late = []
        with pytest.raises(PdserveError) as ended:
            for chunk in chunks:
                late += chunk.token_ids
    assert ended.value.code == grpc.StatusCode.ABORTED
    assert "took over this stream" in ended.value.message
    assert received + late == undisturbed.token_ids[: len(received) + len(late)] and len(late) < 200 - len(received)
    assert_engines_idle(deployment)  # the superseded request was stopped in its engine
