"""The OpenAI-compatible HTTP frontend, driven by the official `openai` client against the colocated deployment.

Greedy output equals the gRPC path's for the same prompt, whole and streamed as Server-Sent Events; usage is
reported; bad input gets its precise status and message; a deadline gives 504; a client that goes away, mid-stream
or while it waits for a whole response, stops its request in the engines.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request

import openai
import pytest
import ray

from common.errors import DeadlineExceeded, EngineFailure, InvalidArgument, ModelNotFound, Overloaded
from pdserve_client import Client
from tests.integration.test_serving import assert_engines_idle, scrape, workers

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"
MAX_TOKENS_LIMIT = 512  # tests/conftest.py's deployments
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
PROMPTS = ["Once upon a time", [11, 12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module")
def base_url(deployment):
    return f"http://127.0.0.1:{deployment.http_port}"


@pytest.fixture(scope="module")
def oai(base_url):
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def grpc(deployment):
    with Client(deployment.target) as client:
        yield client


def cancelled_count(deployment) -> float:
    return scrape(deployment).get(("pdserve_requests_total", (("outcome", "cancelled"),)), 0.0)


@pytest.mark.parametrize("prompt", PROMPTS, ids=["text", "token_ids"])
def test_completion_equals_the_grpc_path(oai, grpc, prompt):
    expected = grpc.complete(prompt, max_tokens=24, temperature=0.0, ignore_eos=True)
    assert expected.text and expected.final.completion_tokens == 24

    whole = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert whole.choices[0].text == expected.text
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (
        expected.final.prompt_tokens, 24, expected.final.prompt_tokens + 24)
    assert whole.model == MODEL and whole.object == "text_completion"
    assert whole.model_extra["pdserve"]["decode_instance"] in {"colocated-0", "colocated-1"}

    chunks = list(oai.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    *text_chunks, last = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == expected.text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in text_chunks[:-1])
    assert last.choices == [] and last.usage.completion_tokens == 24
    assert last.usage.prompt_tokens == expected.final.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_chat_completion_equals_the_grpc_path(oai, grpc):
    expected = grpc.complete(CHAT, max_tokens=16, temperature=0.0, ignore_eos=True)
    assert expected.text

    whole = oai.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=16, temperature=0,
                                        extra_body={"ignore_eos": True})
    message = whole.choices[0].message
    assert (message.role, message.content) == ("assistant", expected.text)
    assert whole.object == "chat.completion" and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (expected.final.prompt_tokens, 16)

    chunks = list(oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0, stream=True,
                                              extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)


def test_stream_is_server_sent_events_ending_with_done(base_url):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "temperature": 0, "stream": True}
    request = urllib.request.Request(f"{base_url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        events = [line.decode().rstrip("\n") for line in reply if line.strip()]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] in ("stop", "length")


def test_models_and_health(oai, base_url):
    models = oai.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "pdserve" and models[0].model_extra["max_model_len"] == 1024
    with urllib.request.urlopen(f"{base_url}/health", timeout=10) as reply:
        assert reply.status == 200 and json.loads(reply.read())["status"] == "ok"


BAD = [
    ("empty prompt", {"prompt": ""}, 400, "prompt is empty: send at least one character", None),
    ("max_tokens zero", {"prompt": "hi", "max_tokens": 0}, 400,
     f"sampling.max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got 0", None),
    ("negative temperature", {"prompt": "hi", "temperature": -1}, 400,
     "sampling.temperature must be between 0 and 2 (0 means greedy), got -1.0", None),
    ("unknown model", {"prompt": "hi", "model": "gpt-17"}, 404,
     "model 'gpt-17' is not served here; served models: ['tiny-llama']", None),
    ("several choices", {"prompt": "hi", "n": 2}, 400, "n is not supported by this server; leave it out", "n"),
    ("stop strings", {"prompt": "hi", "stop": ["\n"]}, 400, "stop is not supported by this server", "stop"),
    ("batch of prompts", {"prompt": ["a", "b"]}, 400, "prompt holds 2 prompts; send one prompt per request",
     "prompt"),
    ("empty prompt, streamed", {"prompt": "", "stream": True}, 400, "prompt is empty", None),
]


@pytest.mark.parametrize(("fields", "status", "message", "param"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_completion_gets_a_precise_error(oai, fields, status, message, param):
    fields = {"model": MODEL, "max_tokens": 4} | fields
    with pytest.raises(openai.APIStatusError) as e:
        oai.completions.create(**fields)
    assert e.value.status_code == status
    assert message in e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error"
    assert e.value.body["code"] == ("model_not_found" if status == 404 else "invalid_argument")
    assert e.value.body["param"] == param


def test_bad_chat_gets_a_precise_error(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    assert "chat.messages is empty: send at least one message" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}], max_tokens=4)
    expected = "chat.messages[0].role must be one of ['system', 'user', 'assistant'], got 'robot'"
    assert expected in e.value.body["message"]


@pytest.mark.parametrize(("data", "message", "param"), [
    (b"{not json", "the request body is not valid JSON: ", None),
    (json.dumps({"model": MODEL, "max_tokens": 4}).encode(), "invalid request body: prompt: Field required", "prompt"),
    (json.dumps({"prompt": "hi", "max_tokens": "many"}).encode(), "invalid request body: max_tokens: ", "max_tokens"),
], ids=["not json", "no prompt", "max_tokens not a number"])
def test_malformed_body_is_400_in_openai_shape(base_url, data, message, param):
    request = urllib.request.Request(f"{base_url}/v1/completions", data=data,
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    error = json.loads(e.value.read())["error"]
    assert e.value.code == 400
    assert error["message"].startswith(message) and error["param"] == param


def test_an_idle_connection_outlives_clients_pool_timeouts(deployment):
    """A keep-alive connection left idle past uvicorn's default 5 s still serves the next request."""
    connection = http.client.HTTPConnection("127.0.0.1", deployment.http_port, timeout=30)
    try:
        connection.request("GET", "/v1/models")
        assert connection.getresponse().read() and connection.sock is not None
        sock = connection.sock
        time.sleep(6.0)  # the idle time under test, not a wait for anything
        connection.request("GET", "/v1/models")
        reply = connection.getresponse()
        assert reply.status == 200 and json.loads(reply.read())["data"]
        assert connection.sock is sock  # the same connection, not a new one
    finally:
        connection.close()


def test_unknown_path_is_404_in_openai_shape(base_url):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{base_url}/v1/embeddings", timeout=30)
    assert e.value.code == 404 and json.loads(e.value.read())["error"]["message"] == "Not Found"


def test_deadline_is_504_and_stops_the_request(oai, deployment):
    with pytest.raises(openai.InternalServerError) as e:
        oai.completions.create(model=MODEL, prompt=[8] * 30, max_tokens=MAX_TOKENS_LIMIT, temperature=0,
                               extra_body={"ignore_eos": True}, extra_headers={"X-Request-Timeout": "1"})
    assert e.value.status_code == 504
    assert e.value.body["message"] == "the request's deadline passed before it finished"
    assert e.value.body["code"] == "deadline_exceeded"
    assert_engines_idle(deployment)
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_headers={"X-Request-Timeout": "soon"})
    assert "header X-Request-Timeout must be a positive number of seconds, got 'soon'" in e.value.body["message"]


def test_disconnect_mid_stream_stops_the_request_in_the_engine(oai, deployment):
    before = cancelled_count(deployment)
    stream = oai.completions.create(model=MODEL, prompt=[7] * 30, max_tokens=MAX_TOKENS_LIMIT, temperature=0,
                                    stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it)
    next(it)
    assert sum(s.running for s in ray.get([h.stats.remote() for h in workers(deployment)])) == 1
    stream.close()
    assert_engines_idle(deployment)
    assert cancelled_count(deployment) == before + 1


def test_disconnect_before_a_whole_response_stops_the_request(oai, deployment):
    before = cancelled_count(deployment)
    with pytest.raises(openai.APITimeoutError):
        oai.with_options(timeout=1.0).completions.create(
            model=MODEL, prompt=[9] * 30, max_tokens=MAX_TOKENS_LIMIT, temperature=0, extra_body={"ignore_eos": True})
    assert_engines_idle(deployment)
    assert cancelled_count(deployment) == before + 1
    # The server keeps serving.
    assert oai.completions.create(model=MODEL, prompt="still there?", max_tokens=2).usage.completion_tokens == 2


@pytest.mark.parametrize(("error", "status", "code"), [
    (InvalidArgument("x"), 400, "invalid_argument"),
    (ModelNotFound("x"), 404, "model_not_found"),
    (Overloaded("x", retry_after_s=2.5), 429, "overloaded"),
    (DeadlineExceeded("x"), 504, "deadline_exceeded"),
    (EngineFailure("x"), 503, "engine_failure"),
])
def test_every_serving_error_has_its_http_status(error, status, code):
    from router.http_server import error_response

    reply = error_response(error)
    assert reply.status_code == status
    assert json.loads(reply.body)["error"] | {"type": None} == {"message": "x", "type": None, "param": None,
                                                                "code": code}
    assert reply.headers.get("retry-after") == ("3" if status == 429 else None)


def _raw_post(port: int, request: bytes) -> tuple[int, dict]:
    """Sends `request` (a head and what of a body the server reads before it answers); its status and JSON body."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def test_a_body_over_the_limit_is_413_by_its_length_or_as_it_streams(deployment):
    from router.http_server import MAX_BODY_BYTES

    # Declared too long: refused on the head alone, before a byte of the body is sent.
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {MAX_BODY_BYTES + 1}\r\nConnection: close\r\n\r\n").encode()
    status, body = _raw_post(deployment.http_port, head)
    assert status == 413 and body["error"]["code"] == "body_too_large"
    # No declared length: refused once the chunks pass the limit. The last chunk sent is the one byte that does, so
    # the server has read all that was sent when it answers (else it would reset the connection, not close it).
    chunked = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    mib = 1 << 20
    chunks = b"".join(b"%x\r\n%s\r\n" % (mib, b"x" * mib) for _ in range(MAX_BODY_BYTES // mib)) + b"1\r\nx\r\n"
    status, body = _raw_post(deployment.http_port, chunked + chunks)
    assert status == 413 and body["error"]["code"] == "body_too_large"


def test_health_answers_while_32_streams_run(deployment, base_url):
    with Client(deployment.target) as client:
        streams = [client.generate([11 + i, 12, 13], max_tokens=400, temperature=0.0, ignore_eos=True)
                   for i in range(32)]
        try:
            firsts = [next(iter(s)) for s in streams]  # every stream has begun
            assert all(f.final is None for f in firsts)
            with urllib.request.urlopen(f"{base_url}/health", timeout=30) as reply:
                assert reply.status == 200 and json.loads(reply.read())["status"] == "ok"
            assert all(next(iter(s)).final is None for s in streams)  # none had ended when health answered
        finally:
            for s in streams:
                s.cancel()
