"""The SDK's retries, resumption, deadlines and token, against a real gRPC server whose answers each test scripts.

The server speaks `pdserve.v1` but generates nothing: it fails the calls a test tells it to (UNAVAILABLE, or
RESOURCE_EXHAUSTED with a retry hint), cuts a stream after some tokens, and records every request it got, so
the tests see what the client sent on the wire: how often, when, with which key and resume tokens.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest

from pdserve_client import (
    AsyncClient,
    Cancelled,
    Client,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Retry,
    Unavailable,
)
from pdserve_client.retry import retry_after_s
from pdserve_client.v1 import pdserve_pb2 as pb

FAST = Retry(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
TOKENS = list(range(100, 120))


@dataclass
class Seen:
    method: str
    at: float
    metadata: dict[str, str]
    remaining: float | None  # the call's deadline as the server saw it, seconds
    request: object = None


@dataclass
class Script:
    """What the server does: `failures` holds the status of each next failing call (then calls succeed);
    `cut_after` ends the Generate streams of the first len(cut_after) calls with UNAVAILABLE after that many
    tokens (counted from the start of the whole generation)."""

    failures: list[tuple[grpc.StatusCode, str | None]] = field(default_factory=list)
    cut_after: list[int] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, method, context, request=None) -> tuple[grpc.StatusCode, str | None] | None:
        with self.lock:
            metadata = dict(context.invocation_metadata())
            self.seen.append(Seen(method, time.monotonic(), metadata, context.time_remaining(), request))
            return self.failures.pop(0) if self.failures else None


def fail(context, failure):
    code, hint_ms = failure
    if hint_ms is not None:
        context.set_trailing_metadata((("pdserve-retry-after-ms", hint_ms),))
    context.abort(code, f"scripted {code.name}")


class ScriptedServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        handlers = {
            "GetServerInfo": grpc.unary_unary_rpc_method_handler(
                self.server_info, pb.GetServerInfoRequest.FromString, pb.ServerInfo.SerializeToString
            ),
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.generate, pb.GenerateRequest.FromString, pb.GenerateResponse.SerializeToString
            ),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("pdserve.v1.Generation", handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def server_info(self, request, context):
        failure = self.script.record("GetServerInfo", context)
        if failure:
            fail(context, failure)
        return pb.ServerInfo(version="scripted", max_tokens_limit=64)

    def generate(self, request, context):
        failure = self.script.record("Generate", context, request)
        if failure:
            fail(context, failure)
        n = request.sampling.max_tokens
        start = len(request.resume_token_ids)
        with self.script.lock:
            cut = self.script.cut_after.pop(0) if self.script.cut_after else None
        # Two tokens per message, as an engine step may give.
        for i in range(start, n, 2):
            if cut is not None and i >= cut:
                context.abort(grpc.StatusCode.UNAVAILABLE, "scripted: the stream broke")
            ids = TOKENS[i : min(i + 2, n)]
            msg = pb.GenerateResponse(request_id=request.request_id, token_ids=ids, text=f"<{i}>")
            if i + 2 >= n:
                msg.final.finish_reason = pb.FINISH_REASON_LENGTH
                msg.final.usage.completion_tokens = n
            yield msg

    def calls(self, method: str) -> list[Seen]:
        return [s for s in self.script.seen if s.method == method]


@pytest.fixture
def script():
    return Script()


@pytest.fixture
def server(script):
    s = ScriptedServer(script)
    yield s
    s.server.stop(None)


def client(server, **options) -> Client:
    return Client(f"127.0.0.1:{server.port}", **{"retry": FAST, **options})


def test_unavailable_is_retried_until_it_succeeds(server, script):
    script.failures = [(grpc.StatusCode.UNAVAILABLE, None)] * 2
    with client(server) as c:
        assert c.server_info().version == "scripted"
    assert len(server.calls("GetServerInfo")) == 3


def test_retries_stop_after_max_attempts(server, script):
    script.failures = [(grpc.StatusCode.UNAVAILABLE, None)] * 5
    with client(server) as c, pytest.raises(Unavailable, match="scripted UNAVAILABLE"):
        c.server_info()
    assert len(server.calls("GetServerInfo")) == FAST.max_attempts


def test_errors_the_request_caused_are_not_retried(server, script):
    script.failures = [(grpc.StatusCode.INVALID_ARGUMENT, None)]
    with client(server) as c, pytest.raises(InvalidArgument):
        list(c.generate([1, 2], max_tokens=4))
    assert len(server.calls("Generate")) == 1


def test_overload_is_reported_with_its_hint_unless_retries_are_asked_for(server, script):
    script.failures = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "250")]
    with client(server) as c, pytest.raises(ResourceExhausted) as refused:
        c.server_info()
    assert refused.value.retry_after_s == pytest.approx(0.25)
    assert len(server.calls("GetServerInfo")) == 1


def test_overload_retry_waits_at_least_the_servers_hint(server, script):
    script.failures = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "300")]
    retry = Retry(max_attempts=2, initial_backoff_s=0.0, max_backoff_s=0.01, resource_exhausted=True)
    with client(server, retry=retry) as c:
        done = c.complete([1, 2], max_tokens=6)
    assert done.token_ids == TOKENS[:6]
    first, second = server.calls("Generate")
    assert second.at - first.at >= 0.3


def test_a_deadline_bounds_the_retries(server, script):
    script.failures = [(grpc.StatusCode.UNAVAILABLE, None)] * 50
    retry = Retry(max_attempts=50, initial_backoff_s=0.2, max_backoff_s=0.2)
    started = time.monotonic()
    # The last failure: the server's, or the deadline's when it passes during the last attempt.
    with client(server, retry=retry) as c, pytest.raises((Unavailable, DeadlineExceeded)):
        c.server_info(timeout=1.0)
    assert time.monotonic() - started < 1.5  # 50 attempts would take about 5 s
    assert 1 < len(server.calls("GetServerInfo")) < 50


def test_the_deadline_covers_the_whole_call(server, script):
    script.failures = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "500")]
    script.cut_after = [4]
    retry = Retry(max_attempts=3, initial_backoff_s=0.0, max_backoff_s=0.0, resource_exhausted=True)
    with client(server, retry=retry) as c:
        assert len(c.complete([1], max_tokens=10, timeout=2.0).token_ids) == 10
    first, second, third = server.calls("Generate")
    # Each attempt gets what is left of the 2 s (the first wait took 0.5 s of it), not 2 s afresh. (gRPC sends
    # deadlines rounded up to a few significant digits.)
    assert first.remaining <= 2.01
    assert second.remaining <= 1.55
    assert third.remaining <= second.remaining + 0.01


def test_a_broken_stream_resumes_with_the_received_tokens(server, script):
    script.cut_after = [4, 10]  # two breaks in one generation
    with client(server, token="t0k") as c:
        stream = c.generate([7, 8, 9], max_tokens=14, temperature=0.0, request_id="key-1")
        chunks = list(stream)
    assert [t for ch in chunks for t in ch.token_ids] == TOKENS[:14]  # no gap, no repeat
    assert "".join(ch.text for ch in chunks) == "<0><2><4><6><8><10><12>"
    assert chunks[-1].final.completion_tokens == 14 and stream.resumes == 2
    calls = server.calls("Generate")
    assert [list(c.request.resume_token_ids) for c in calls] == [[], TOKENS[:4], TOKENS[:10]]
    assert {c.request.request_id for c in calls} == {"key-1"}
    assert all(list(c.request.prompt_token_ids.ids) == [7, 8, 9] for c in calls)
    assert all(c.request.sampling.max_tokens == 14 for c in calls)
    assert {c.metadata["authorization"] for c in calls} == {"Bearer t0k"}


def test_every_generation_gets_a_key(server, script):
    with client(server) as c:
        a, b = c.generate([1], max_tokens=2), c.generate([1], max_tokens=2)
        list(a), list(b)
    keys = [c.request.request_id for c in server.calls("Generate")]
    assert sorted(keys) == sorted([a.request_id, b.request_id]) and len(set(keys)) == 2 and all(keys)


def test_resume_can_be_turned_off(server, script):
    script.cut_after = [4]
    received = []
    with client(server, retry=Retry(resume=False)) as c, pytest.raises(Unavailable, match="the stream broke"):
        for chunk in c.generate([1], max_tokens=10):
            received += chunk.token_ids
    assert received == TOKENS[:4] and len(server.calls("Generate")) == 1


def test_cancel_ends_a_stream_waiting_to_try_again(server, script):
    script.failures = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "60000")]  # come back in a minute
    with client(server, retry=Retry(resource_exhausted=True)) as c:
        stream = c.generate([1], max_tokens=10)
        threading.Timer(0.2, stream.cancel).start()  # from another thread, while the stream waits
        started = time.monotonic()
        with pytest.raises(Cancelled):
            list(stream)
    assert time.monotonic() - started < 30
    assert len(server.calls("Generate")) == 1


def test_async_client_resumes_too(server, script):
    script.cut_after = [6]

    async def run():
        async with AsyncClient(f"127.0.0.1:{server.port}", retry=FAST, token="t0k") as c:
            stream = c.generate([3], max_tokens=9, request_id="async-key")
            chunks = [chunk async for chunk in stream]
            info = await c.server_info()
            return chunks, stream.resumes, info

    script.failures = []
    chunks, resumes, info = asyncio.run(run())
    assert [t for ch in chunks for t in ch.token_ids] == TOKENS[:9] and resumes == 1
    assert info.version == "scripted"
    calls = server.calls("Generate")
    assert [list(c.request.resume_token_ids) for c in calls] == [[], TOKENS[:6]]
    assert {c.metadata["authorization"] for c in server.script.seen} == {"Bearer t0k"}


def test_async_unary_calls_retry(server, script):
    script.failures = [(grpc.StatusCode.UNAVAILABLE, None)]

    async def run():
        async with AsyncClient(f"127.0.0.1:{server.port}", retry=FAST) as c:
            return await c.server_info()

    assert asyncio.run(run()).version == "scripted"
    assert len(server.calls("GetServerInfo")) == 2


def test_a_generation_past_its_deadline_is_not_retried(server, script):
    script.failures = [(grpc.StatusCode.DEADLINE_EXCEEDED, None)]
    with client(server) as c, pytest.raises(DeadlineExceeded):
        list(c.generate([1], max_tokens=4, timeout=5))
    assert len(server.calls("Generate")) == 1


# The policy itself, without a server.


class FixedDraw(random.Random):
    """Draws the top of every range, so the tests see the cap of each backoff."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_grows_exponentially_up_to_its_cap():
    retry = Retry(max_attempts=10, initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0)
    caps = [retry.delay(grpc.StatusCode.UNAVAILABLE, n, None, FixedDraw()) for n in range(1, 10)]
    assert caps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert retry.delay(grpc.StatusCode.UNAVAILABLE, 10, None, FixedDraw()) is None


def test_backoff_is_jittered_within_its_cap():
    retry = Retry(max_attempts=10, initial_backoff_s=0.1, max_backoff_s=1.0)
    waits = [retry.delay(grpc.StatusCode.UNAVAILABLE, 4, None, random.Random(seed)) for seed in range(200)]
    assert all(0 <= w <= 0.8 for w in waits) and len(set(waits)) == 200
    assert min(waits) < 0.2 and max(waits) > 0.6  # spread over the range, not bunched


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ],
)
def test_only_unavailable_is_retried_by_default(code):
    assert Retry().delay(code, 1, 0.1, random.Random(0)) is None


def test_overload_retry_follows_the_hint_or_backs_off_without_one():
    retry = Retry(resource_exhausted=True, max_backoff_s=1.0)
    assert 2.0 <= retry.delay(grpc.StatusCode.RESOURCE_EXHAUSTED, 1, 2.0, random.Random(0)) <= 2.1
    assert 0 <= retry.delay(grpc.StatusCode.RESOURCE_EXHAUSTED, 1, None, random.Random(0)) <= 0.1


@pytest.mark.parametrize(
    ("metadata", "seconds"),
    [
        ((("pdserve-retry-after-ms", "1500"),), 1.5),
        ((("other", "1"), ("pdserve-retry-after-ms", "0")), 0.0),
        ((("pdserve-retry-after-ms", "soon"),), None),
        ((("pdserve-retry-after-ms", "-5"),), None),
        ((), None),
        (None, None),
    ],
)
def test_the_retry_hint_is_read_from_trailing_metadata(metadata, seconds):
    assert retry_after_s(metadata) == seconds


@pytest.mark.parametrize(
    "fields", [{"max_attempts": 0}, {"initial_backoff_s": 2.0, "max_backoff_s": 1.0}, {"multiplier": 0.5}]
)
def test_bad_policies_are_refused(fields):
    with pytest.raises(ValueError):
        Retry(**fields)
