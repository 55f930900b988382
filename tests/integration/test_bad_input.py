"""Every malformed request gets a precise status and a message naming the field; the server keeps serving."""

from __future__ import annotations

import grpc
import pytest
import ray

from pdserve_client import Client, InvalidArgument, NotFound, PdserveError

pytestmark = pytest.mark.integration

MAX_MODEL_LEN = 1024
MAX_TOKENS_LIMIT = 512


@pytest.fixture(scope="module")
def client(deployment):
    with Client(deployment.target) as c:
        yield c


CASES = [
    ("empty prompt", "", {"max_tokens": 4}, InvalidArgument, "prompt is empty"),
    ("prompt too long", [100] * MAX_MODEL_LEN, {"max_tokens": 4}, InvalidArgument,
     f"prompt is {MAX_MODEL_LEN} tokens long; this model accepts at most {MAX_MODEL_LEN - 1} prompt tokens"),
    ("text prompt too long", "hello " * 2000, {"max_tokens": 4}, InvalidArgument,
     f"this model accepts at most {MAX_MODEL_LEN - 1} prompt tokens"),
    ("max_tokens zero", "hi", {"max_tokens": 0}, InvalidArgument,
     f"sampling.max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got 0"),
    ("max_tokens above limit", "hi", {"max_tokens": MAX_TOKENS_LIMIT + 1}, InvalidArgument,
     f"sampling.max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got {MAX_TOKENS_LIMIT + 1}"),
    ("negative temperature", "hi", {"max_tokens": 4, "temperature": -0.5}, InvalidArgument,
     "sampling.temperature must be between 0 and 2 (0 means greedy), got -0.5"),
    ("top_p zero", "hi", {"max_tokens": 4, "top_p": 0.0}, InvalidArgument, "sampling.top_p must be in (0, 1], got 0.0"),
    ("top_p above one", "hi", {"max_tokens": 4, "top_p": 1.5}, InvalidArgument,
     "sampling.top_p must be in (0, 1], got 1.5"),
    ("token id outside vocabulary", [10**7], {"max_tokens": 4}, InvalidArgument,
     "prompt_token_ids.ids holds token id 10000000"),
]


@pytest.mark.parametrize(("prompt", "fields", "error", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_a_precise_error(client, prompt, fields, error, message):
    with pytest.raises(error) as e:
        list(client.generate(prompt, timeout=30, **fields))
    assert message in e.value.message
    assert e.value.code == error.code


def test_unknown_model_is_not_found(client):
    with pytest.raises(NotFound) as e:
        list(client.generate("hi", model="gpt-17", max_tokens=4, timeout=30))
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert "model 'gpt-17' is not served here; served models: ['tiny-llama']" in e.value.message


def test_invalid_utf8_is_invalid_argument(deployment):
    # GenerateRequest with field 2 (prompt, a proto3 string) holding bytes that are not UTF-8.
    raw = bytes([0x12, 0x02, 0xFF, 0xFE])
    with grpc.insecure_channel(deployment.target) as channel:
        call = channel.unary_stream("/pdserve.v1.Generation/Generate")
        with pytest.raises(grpc.RpcError) as e:
            list(call(raw, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "string fields must hold valid UTF-8" in e.value.details()


def test_server_and_workers_survive_bad_input(client, deployment):
    for _, prompt, fields, _, _ in CASES:
        with pytest.raises(PdserveError):
            list(client.generate(prompt, timeout=30, **fields))
    done = client.complete("Hello", max_tokens=3, temperature=0.0, ignore_eos=True, timeout=60)
    assert len(done.token_ids) == 3
    pids = ray.get([i.handle.pid.remote() for i in deployment.router.registry.all()])
    assert len(set(pids)) == 2
