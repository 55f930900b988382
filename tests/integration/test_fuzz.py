"""Fuzzing the frontends: malformed and extreme requests get a precise status, and nothing breaks.

Hypothesis sends to the session's colocated deployment of the tiny model:

- gRPC `GenerateRequest`s that are well formed on the wire but hold extreme or invalid values (empty and
  oversized prompts, token ids outside the vocabulary, `max_tokens` 0 or huge, NaN/inf/negative temperature,
  `top_p` outside (0, 1], unknown models, invalid chat roles, unicode edge cases, no input at all);
- raw bytes through a channel method without serializers: random bytes, valid requests with bytes flipped,
  inserted or cut, and two requests concatenated (protobuf merges them, so prompt kinds mix);
- HTTP bodies to `/v1/completions` and `/v1/chat/completions`: random JSON with wrong types, nested junk, huge
  numbers, `stream` true and false, and bytes that are not JSON.

Every reply must have a precise status: gRPC OK, INVALID_ARGUMENT, OUT_OF_RANGE or NOT_FOUND (never UNKNOWN,
INTERNAL or a deadline), HTTP 200, 400 or 404 (never 5xx, never a broken connection), with a non-empty error
message. A reply of OK/200 is a whole stream whose token counts add up. Every `CHECK_EVERY` examples and at the
end of each test a well-formed request must still get exactly the tokens it asked for, and the workers' pids
must not change (no worker crashed and was restarted).

`PDSERVE_FUZZ_EXAMPLES` sets the examples per test (150 by default; `make fuzz` runs 2,000 in each of the 5
fuzzing tests: 10,000 cases).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import grpc
import httpx
import pytest
import ray
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve_client.v1 import pdserve_pb2 as pb

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"
MAX_MODEL_LEN = 1024  # tests/conftest.py's TINY_ENGINE
MAX_TOKENS_LIMIT = 512  # tests/conftest.py's deployments
VOCAB = 49152  # SmolLM2's tokenizer, which the tiny model uses
GENERATE = "/pdserve.v1.Generation/Generate"
EXAMPLES = int(os.environ.get("PDSERVE_FUZZ_EXAMPLES", "150"))
CHECK_EVERY = 25
CALL_TIMEOUT = 120.0  # seconds; a valid request asks for at most a few tokens, so only a hang reaches it

GRPC_OK = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
           grpc.StatusCode.NOT_FOUND}
HTTP_OK = {200, 400, 404}

fuzz_settings = settings(max_examples=EXAMPLES, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------------- fixtures

def worker_pids(deployment) -> list[int]:
    return ray.get([i.handle.pid.remote() for i in deployment.router.registry.all()], timeout=60)


class Probe:
    """Sends a well-formed request every `CHECK_EVERY` calls of `tick`, and checks that no worker was replaced."""

    def __init__(self, deployment, channel: grpc.Channel, http: httpx.Client) -> None:
        self.deployment = deployment
        self.pids = worker_pids(deployment)
        self.generate = channel.unary_stream(GENERATE, request_serializer=pb.GenerateRequest.SerializeToString,
                                             response_deserializer=pb.GenerateResponse.FromString)
        self.http = http
        self.count = 0

    def tick(self) -> None:
        self.count += 1
        if self.count % CHECK_EVERY == 0:
            self.check()

    def check(self) -> None:
        request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[11, 12, 13]))
        request.sampling.max_tokens, request.sampling.temperature, request.sampling.ignore_eos = 3, 0.0, True
        replies = list(self.generate(request, timeout=CALL_TIMEOUT))
        assert sum(len(r.token_ids) for r in replies) == 3
        assert replies[-1].final.usage.completion_tokens == 3
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
        reply = self.http.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 3
        assert worker_pids(self.deployment) == self.pids, "a worker was replaced: it crashed under fuzzed input"
        assert all(i.healthy for i in self.deployment.router.registry.all())


@pytest.fixture(scope="module")
def channel(deployment):
    with grpc.insecure_channel(deployment.target) as c:
        yield c


@pytest.fixture(scope="module")
def http(deployment):
    with httpx.Client(base_url=f"http://127.0.0.1:{deployment.http_port}", timeout=CALL_TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def probe(deployment, channel, http):
    p = Probe(deployment, channel, http)
    p.check()
    return p


@pytest.fixture(scope="module")
def raw_generate(channel):
    """Generate with bytes in and bytes out: what the server gets is exactly what hypothesis drew."""
    return channel.unary_stream(GENERATE)


# ------------------------------------------------------------------------------------------------ gRPC values

# Text without lone surrogates (protobuf cannot encode them as UTF-8), with the awkward corners of unicode.
texts = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=40),
    st.sampled_from(["", " ", "\x00", "\u200b", "\ufeff", "\U0001f600" * 50, "\u0301\u0301", "\r\n\t",
                     "<|im_start|>", "<|im_end|>", "{{ raise_exception('x') }}", "{% for %}", "hello " * 600]),
)
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "", "robot", "USER", "tool", "user "]), texts)
token_ids = st.one_of(st.integers(0, VOCAB - 1), st.sampled_from([VOCAB, VOCAB + 1, 2**31, 2**32 - 1]),
                      st.integers(0, 2**32 - 1))
floats32 = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-45, 1e-30, 0.5, 1.0, 1.0000001, 2.0, -1.0, math.inf, -math.inf, math.nan,
                     3.4e38, -3.4e38]),
)
# Valid requests must stay cheap on this machine: a handful of tokens at most.
max_tokens = st.one_of(st.integers(1, 4), st.integers(0, 4), st.sampled_from([MAX_TOKENS_LIMIT + 1, 2**31, 2**32 - 1]))
# Valid on the wire and in the README's ranges, but extreme: what the engine itself may refuse.
extreme_temperatures = st.one_of(st.floats(2.0, width=32, allow_infinity=False),
                                 st.sampled_from([1e-45, 1e-30, 2.0000002, 1e6]))
models = st.one_of(st.just(""), st.just(MODEL), st.sampled_from(["gpt-17", MODEL + " ", MODEL.upper()]), texts)


@st.composite
def prompts(draw: Any, request: pb.GenerateRequest) -> None:
    kind = draw(st.sampled_from(["text", "chat", "ids", "long ids", "none"]))
    if kind == "text":
        request.prompt = draw(texts)
    elif kind == "chat":
        messages = draw(st.lists(st.tuples(roles, texts), max_size=5))
        request.chat.SetInParent()  # an empty chat is still a chat
        request.chat.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in messages)
    elif kind == "ids":
        request.prompt_token_ids.SetInParent()
        request.prompt_token_ids.ids.extend(draw(st.lists(token_ids, max_size=20)))
    elif kind == "long ids":  # around the longest prompt the model accepts (max_model_len - 1)
        n = draw(st.sampled_from([MAX_MODEL_LEN - 2, MAX_MODEL_LEN - 1, MAX_MODEL_LEN, MAX_MODEL_LEN + 1, 5000]))
        request.prompt_token_ids.ids.extend([draw(st.integers(0, VOCAB - 1))] * n)


@st.composite
def generate_requests(draw: Any) -> pb.GenerateRequest:
    request = pb.GenerateRequest(model=draw(models))
    draw(prompts(request))
    if draw(st.integers(0, 3)):  # mostly with sampling parameters
        s = request.sampling
        s.max_tokens = draw(max_tokens)
        for name in ("temperature", "top_p"):
            if draw(st.booleans()):
                setattr(s, name, draw(st.one_of(floats32, extreme_temperatures)))
        if draw(st.booleans()):
            s.top_k = draw(st.one_of(st.integers(0, 100), st.integers(0, 2**32 - 1)))
        if draw(st.booleans()):
            s.seed = draw(st.one_of(st.integers(0, 100), st.integers(0, 2**64 - 1)))
        s.ignore_eos = draw(st.booleans())
        s.stop_token_ids.extend(draw(st.lists(token_ids, max_size=4)))
    return request


def expected_grpc_codes(data: bytes) -> set[grpc.StatusCode]:
    """The statuses `data` may get: an unparsable request only INVALID_ARGUMENT; an unknown model only
    NOT_FOUND (it is checked first); a request that cannot be valid no OK."""
    try:
        msg = pb.GenerateRequest.FromString(data)
    except DecodeError:
        return {grpc.StatusCode.INVALID_ARGUMENT}
    if msg.model not in ("", MODEL):
        return {grpc.StatusCode.NOT_FOUND}
    s = msg.sampling
    surely_bad = (
        msg.WhichOneof("input") is None
        or not 1 <= s.max_tokens <= MAX_TOKENS_LIMIT
        or (s.HasField("temperature") and not (math.isfinite(s.temperature) and s.temperature >= 0))
        or (s.HasField("top_p") and not (math.isfinite(s.top_p) and 0 < s.top_p <= 1))
        or any(t >= VOCAB for t in s.stop_token_ids)
        or any(t >= VOCAB for t in msg.prompt_token_ids.ids)
        or len(msg.prompt_token_ids.ids) >= MAX_MODEL_LEN
    )
    return GRPC_OK - {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND} if surely_bad else GRPC_OK


def send_grpc(raw_generate, data: bytes) -> None:
    """Sends `data` as a GenerateRequest and asserts a precise status and, when OK, a consistent stream."""
    replies: list[pb.GenerateResponse] = []
    try:
        for reply in raw_generate(data, timeout=CALL_TIMEOUT):
            replies.append(pb.GenerateResponse.FromString(reply))
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        code, details = e.code(), e.details()
    expected = expected_grpc_codes(data)
    assert code in expected, f"{code} ({details!r}) for {data!r}; expected one of {sorted(c.name for c in expected)}"
    if code != grpc.StatusCode.OK:
        assert details and details.strip(), f"{code} without a message for {data!r}"
        return
    msg = pb.GenerateRequest.FromString(data)
    assert replies and replies[-1].HasField("final") and not any(r.HasField("final") for r in replies[:-1])
    final = replies[-1].final
    assert final.usage.completion_tokens == sum(len(r.token_ids) for r in replies)
    assert 1 <= final.usage.completion_tokens <= msg.sampling.max_tokens
    assert final.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


# --------------------------------------------------------------------------------------------------- gRPC tests

@fuzz_settings
@given(request=generate_requests())
def test_grpc_extreme_field_values(raw_generate, probe, request):
    send_grpc(raw_generate, request.SerializeToString())
    probe.tick()


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # negative numbers as protobuf writes them: ten bytes of two's complement
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def mutated_requests(draw: Any) -> bytes:
    """A valid request's bytes, damaged: flipped, inserted or cut bytes, or a field with another wire type."""
    data = bytearray(draw(generate_requests()).SerializeToString())
    how = draw(st.sampled_from(["flip", "insert", "cut", "truncate", "field"]))
    if how == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
    elif how == "insert":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=8))
    elif how == "cut" and data:
        i = draw(st.integers(0, len(data) - 1))
        del data[i:i + draw(st.integers(1, 8))]
    elif how == "truncate":
        del data[draw(st.integers(0, len(data))):]
    else:  # a known or unknown field number with any wire type and payload, e.g. a negative max_tokens
        number, wire = draw(st.integers(1, 40)), draw(st.sampled_from([0, 1, 2, 5, 3, 4, 6, 7]))
        payload = {0: _varint(draw(st.integers(-(2**63), 2**64 - 1))),
                   1: struct.pack("<d", draw(st.floats(allow_nan=True))),
                   2: _varint(len(b := draw(st.binary(max_size=16)))) + b,
                   5: struct.pack("<f", draw(st.floats(width=32, allow_nan=True)))}.get(wire, b"")
        data += _varint(number << 3 | wire) + payload
    return bytes(data)


@fuzz_settings
@given(data=st.one_of(
    st.binary(max_size=64),
    mutated_requests(),
    # Two requests concatenated: protobuf merges them, so the second's prompt kind replaces the first's.
    st.tuples(generate_requests(), generate_requests()).map(lambda p: p[0].SerializeToString()
                                                            + p[1].SerializeToString()),
))
def test_grpc_raw_bytes(raw_generate, probe, data):
    send_grpc(raw_generate, data)
    probe.tick()


def test_grpc_unparsable_bytes_are_invalid_argument(raw_generate, probe):
    for data in (b"\xff", b"\x12\x02\xff\xfe", b"\x0a\x05ab", b"\x2a\x10\x08", b"\x08" + b"\xff" * 11):
        with pytest.raises(grpc.RpcError) as e:
            list(raw_generate(data, timeout=CALL_TIMEOUT))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (data, e.value.details())
        assert "is not a valid pdserve.v1.GenerateRequest" in e.value.details()
    probe.check()


# ------------------------------------------------------------------------------------------------- HTTP values

# JSON can carry what UTF-8 cannot: lone surrogates, written as escapes ("\\ud800").
http_texts = st.one_of(texts, st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3),
                       st.tuples(texts, st.characters(categories=["Cs"])).map("".join))
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64, 10**30, 1e308, -1e308, 5e-324, 0.5, "", "1", "NaN", "inf"]),
    texts,
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
small_tokens = st.integers(1, 4)


def field(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A body field's value: mostly what the field expects, sometimes any JSON at all."""
    return st.one_of(value, value, json_values)


SAMPLING_FIELDS = {
    "model": field(st.sampled_from(["", MODEL, "gpt-17"])),
    "temperature": field(st.one_of(st.floats(-2, 3), st.just(0), st.floats(2, 1e308))),
    "top_p": field(st.floats(-1, 2)),
    "top_k": field(st.integers(-3, 100) | st.integers(-(2**40), 2**40)),
    "seed": field(st.integers(-(2**70), 2**70)),
    "ignore_eos": field(st.booleans()),
    "stop_token_ids": field(st.lists(st.integers(-5, VOCAB + 5), max_size=3)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": field(st.booleans())})),
    "n": field(st.integers(0, 3)),
    "stop": field(st.one_of(st.none(), st.lists(texts, max_size=2))),
    "logprobs": field(st.one_of(st.none(), st.booleans(), st.integers(0, 3))),
    "response_format": field(st.just({"type": "text"})),
    "unknown_field": json_values,
}
completion_prompts = st.one_of(
    http_texts, st.lists(token_ids, max_size=12), st.lists(http_texts, max_size=3),
    st.lists(st.lists(token_ids, max_size=6), max_size=3), st.lists(st.integers(-(2**70), 2**70), max_size=3),
    st.just([7] * (MAX_MODEL_LEN + 3)),
)
content_parts = st.lists(st.fixed_dictionaries({"type": field(st.sampled_from(["text", "image_url"]))},
                                               optional={"text": field(http_texts)}), max_size=3)
chat_messages = st.lists(
    st.fixed_dictionaries({"role": field(roles)}, optional={"content": field(st.one_of(http_texts, content_parts))}),
    max_size=4,
)


@st.composite
def completion_bodies(draw: Any) -> dict[str, Any]:
    body = draw(st.fixed_dictionaries({}, optional={"prompt": field(completion_prompts), **SAMPLING_FIELDS}))
    # Absent or null max_tokens means 16 tokens: still cheap.
    if draw(st.booleans()):
        body["max_tokens"] = draw(field(st.one_of(small_tokens, st.integers(-3, 0), st.integers(513, 2**70))))
    return body


@st.composite
def chat_bodies(draw: Any) -> dict[str, Any]:
    body = draw(st.fixed_dictionaries({}, optional={"messages": field(chat_messages), **SAMPLING_FIELDS}))
    # Without a token count a chat may run to max_tokens_limit (slow here); max_completion_tokens wins when set.
    body["max_completion_tokens"] = draw(st.one_of(small_tokens, st.integers(-3, 0), st.integers(513, 2**70),
                                                   json_values.filter(lambda v: v is not None)))
    if draw(st.booleans()):
        body["max_tokens"] = draw(json_values)
    return body


def requested_tokens(path: str, body: dict[str, Any]) -> int:
    """The most tokens a 200 reply may hold (pydantic's lax mode accepts "3", 3.0 and true as ints)."""
    names = ("max_completion_tokens", "max_tokens") if path == "/v1/chat/completions" else ("max_tokens",)
    n = next((body[k] for k in names if body.get(k) is not None), None)
    if n is None:
        return 16 if path == "/v1/completions" else MAX_TOKENS_LIMIT
    return int(float(n))


def send_http(http: httpx.Client, path: str, content: bytes, body: Any = None) -> None:
    """POSTs `content` and asserts a precise status and an OpenAI-shaped reply."""
    with http.stream("POST", path, content=content, headers={"Content-Type": "application/json"}) as reply:
        raw = reply.read()  # a broken connection raises here
    status = reply.status_code
    assert status in HTTP_OK, f"HTTP {status} ({raw[:500]!r}) for {path} {content[:500]!r}"
    if status != 200:
        error = json.loads(raw)["error"]
        assert isinstance(error["message"], str) and error["message"].strip(), raw
        assert error["type"] == "invalid_request_error", raw
        # A body that is not UTF-8 is refused by FastAPI itself (HTTPException), which sets no code.
        codes = {"model_not_found"} if status == 404 else {"invalid_argument", None}
        assert error["code"] in codes, raw
        return
    assert isinstance(body, dict), f"200 for a body that is not a JSON object: {content[:500]!r}"
    limit = requested_tokens(path, body)
    if reply.headers["content-type"].startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in raw.decode().split("\n\n") if line]
        assert events[-1] == "[DONE]", raw[-500:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks), f"the stream ended with an error: {raw[-500:]!r}"
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] in ("stop", "length")
        return
    whole = json.loads(raw)
    assert whole["choices"][0]["finish_reason"] in ("stop", "length")
    assert 1 <= whole["usage"]["completion_tokens"] <= limit


# --------------------------------------------------------------------------------------------------- HTTP tests

@fuzz_settings
@given(body=completion_bodies())
def test_http_completions_random_json(http, probe, body):
    send_http(http, "/v1/completions", json.dumps(body).encode(), body)
    probe.tick()


@fuzz_settings
@given(body=chat_bodies())
def test_http_chat_completions_random_json(http, probe, body):
    send_http(http, "/v1/chat/completions", json.dumps(body).encode(), body)
    probe.tick()


@fuzz_settings
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       content=st.one_of(
           st.binary(max_size=64),
           json_values.map(lambda v: json.dumps(v).encode()),  # valid JSON, mostly not an object
           # Deep nesting, but within Python's recursion limit: the router shares this process, and a RecursionError
           # in its JSON parser leaves Python 3.11's compiler confused (pytest then fails to report failures).
           st.integers(1, 300).map(lambda depth: b"[" * depth + b"]" * depth),
           st.sampled_from([b"", b"{", b'{"prompt": NaN, "max_tokens": 2}', b'{"prompt": "hi", "max_tokens": 1e999}',
                            b'{"prompt": "hi", "max_tokens": 2, "temperature": NaN}',
                            b'{"prompt": "hi", "max_tokens": 2, "temperature": Infinity}',
                            b'{"prompt": "hi", "max_tokens": 2, "top_p": -Infinity}',
                            b'{"prompt": "\\ud800", "max_tokens": 2}', b'{"prompt": "hi"}\x00',
                            b'\xef\xbb\xbf{"prompt": "hi", "max_tokens": 1}']),
       ))
def test_http_bytes_that_are_not_a_request(http, probe, path, content):
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    send_http(http, path, content, body)
    probe.tick()


# What the fuzzing found, shrunk to one field each: each must get a precise status, as every fuzzed input must.
FINDINGS_GRPC = [
    ("temperature above 2", {"temperature": 2.5}),  # the engine refuses it: INTERNAL "the worker failed"
    ("temperature float32 max", {"temperature": 3.4e38}),
]
FINDINGS_HTTP = [
    ("temperature above 2", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "temperature": 2.5}),
    ("seed above uint64", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "seed": 2**64}),
    ("seed below int64", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "seed": -(2**63) - 1}),
    ("lone surrogate prompt", "/v1/completions", {"prompt": "\ud800", "max_tokens": 2}),
    ("lone surrogate chat", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a\udfff"}], "max_tokens": 2}),
]


@pytest.mark.parametrize("sampling", [f[1] for f in FINDINGS_GRPC], ids=[f[0] for f in FINDINGS_GRPC])
def test_grpc_findings(raw_generate, probe, sampling):
    request = pb.GenerateRequest(prompt="hi")
    request.sampling.max_tokens = 2
    for name, value in sampling.items():
        setattr(request.sampling, name, value)
    send_grpc(raw_generate, request.SerializeToString())
    probe.check()


@pytest.mark.parametrize(("path", "body"), [f[1:] for f in FINDINGS_HTTP], ids=[f[0] for f in FINDINGS_HTTP])
def test_http_findings(http, probe, path, body):
    send_http(http, path, json.dumps(body).encode(), body)
    probe.check()


def test_still_serving_after_the_fuzzing(probe):
    probe.check()
