"""The frontends' connection limits, on frontends of their own (tight limits) over the colocated deployment's router.

HTTP: a client that withholds or trickles its request head loses its connection after the header timeout, on a
new connection and on a kept-alive one, while an idle kept-alive connection is left alone; a body that does not
arrive in time gets 408; beyond the connection cap a request gets 503 with OpenAI's error body while a stream
already running goes on to its end. gRPC: beyond the stream cap a Generate
call gets RESOURCE_EXHAUSTED naming the setting; gRPC core enforces the per-connection stream cap, the connection
cap, the handshake timeout and the idle and age limits.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve_client import Client, ResourceExhausted, Retry
from router.config import RouterConfig
from tests.conftest import poll

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
HEAD_TIMEOUT_S = 0.5
SEPARATE = [("grpc.use_local_subchannel_pool", 1)]  # a channel of its own connection, not a shared one
CHECK = health_pb2.HealthCheckRequest()
Start = Callable[..., int]  # starts a frontend with the given `RouterConfig` limits; its port


@pytest.fixture()
def http_with(deployment: Any) -> Iterator[Start]:
    """Starts HTTP frontends on the deployment's router with the given limits (`RouterConfig` fields); their ports."""
    from router.http_server import start_http

    servers = []

    def start(**limits: Any) -> int:
        server, port = deployment.loop.run(start_http(deployment.router, HOST, 0, None, RouterConfig(**limits)))
        servers.append(server)
        return int(port)

    yield start
    for server in servers:
        deployment.loop.run(server.stop(grace=1.0))


@pytest.fixture()
def grpc_with(deployment: Any) -> Iterator[Start]:
    """Starts gRPC frontends on the deployment's router with the given limits (`RouterConfig` fields); their ports."""
    from router.grpc_server import start_grpc

    servers = []

    def start(**limits: Any) -> int:
        server, port = deployment.loop.run(start_grpc(deployment.router, HOST, 0, None, RouterConfig(**limits)))
        servers.append(server)
        return port

    yield start
    for server in servers:
        deployment.loop.run(server.stop(None))


def seconds_until_closed(sock: socket.socket) -> float:
    """Reads what the server sends until it closes the connection; the seconds that took (the socket's timeout,
    10 s, fails the test first)."""
    start = time.monotonic()
    while sock.recv(65536):
        pass
    return time.monotonic() - start


def get_health(sock: socket.socket) -> bytes:
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while b'"ok"' not in reply:
        chunk = sock.recv(65536)
        assert chunk, reply
        reply += chunk
    return reply


@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "half a head"])
def test_a_connection_without_a_whole_head_is_closed_after_the_timeout(http_with: Start, sent: bytes) -> None:
    http_port = http_with(header_timeout_s=HEAD_TIMEOUT_S)
    with socket.create_connection(("127.0.0.1", http_port), timeout=10) as sock:
        sock.sendall(sent)
        assert HEAD_TIMEOUT_S * 0.8 <= seconds_until_closed(sock) < 5


def test_a_kept_alive_connection_may_idle_but_not_trickle_its_next_head(http_with: Start) -> None:
    http_port = http_with(header_timeout_s=HEAD_TIMEOUT_S)
    with socket.create_connection(("127.0.0.1", http_port), timeout=10) as sock:
        assert get_health(sock).startswith(b"HTTP/1.1 200")
        time.sleep(3 * HEAD_TIMEOUT_S)  # idle for longer than the head timeout: the time under test
        assert get_health(sock).startswith(b"HTTP/1.1 200")  # the same connection serves
        sock.sendall(b"GET /hea")
        assert seconds_until_closed(sock) < 5


def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closes(http_with: Start) -> None:
    http_port = http_with(body_timeout_s=HEAD_TIMEOUT_S)
    with socket.create_connection(("127.0.0.1", http_port), timeout=10) as sock:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
        sock.sendall(head + b'{"model": ')  # 10 of the 100 bytes it declared, then nothing
        start = time.monotonic()
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        took = time.monotonic() - start
    status, _, body = reply.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 408") and HEAD_TIMEOUT_S * 0.8 <= took < 5
    assert json.loads(body)["error"]["code"] == "body_timeout"


def test_a_request_beyond_the_connection_cap_gets_503_and_streams_go_on(http_with: Start) -> None:
    http_port = http_with(max_http_connections=2)
    streaming = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
    idle = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
    extra = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
    try:
        body = {"model": "tiny-llama", "prompt": [5, 6, 7], "max_tokens": 64, "temperature": 0, "stream": True,
                "ignore_eos": True}
        streaming.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        stream = streaming.getresponse()
        assert stream.status == 200 and stream.readline().startswith(b"data: ")  # the first token is out
        idle.request("GET", "/health")
        assert idle.getresponse().read()  # served: the second of two connections

        extra.request("GET", "/health")
        refused = extra.getresponse()
        assert refused.status == 503 and refused.getheader("connection") == "close"
        assert refused.getheader("retry-after") == "1"
        error = json.loads(refused.read())["error"]  # OpenAI's error body, as every other refusal has
        assert error["code"] == "too_many_connections" and "router.max_http_connections" in error["message"]

        events = [line for line in stream.read().split(b"\n") if line.startswith(b"data: ")]
        assert events[-1] == b"data: [DONE]" and b'"finish_reason":"length"' in events[-2]  # ran to its end
    finally:
        for connection in (streaming, idle, extra):
            connection.close()

    def served() -> bool:
        with contextlib.closing(http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)) as fresh:
            fresh.request("GET", "/health")
            return fresh.getresponse().status == 200

    poll(served, "a request served once the other connections closed", timeout=10, period=0.05)


def test_a_generate_call_beyond_the_stream_cap_is_resource_exhausted(grpc_with: Start) -> None:
    grpc_port = grpc_with(max_grpc_streams=2)
    with Client(f"127.0.0.1:{grpc_port}", retry=Retry(max_attempts=1)) as client:
        def long_stream(i: int) -> Any:
            return client.generate([20 + i, 21, 22], max_tokens=400, temperature=0.0, ignore_eos=True)

        running = [long_stream(0), long_stream(1)]
        try:
            assert all(next(iter(s)).final is None for s in running)  # both have begun
            with pytest.raises(ResourceExhausted) as refused:
                client.complete([30, 31], max_tokens=2)
            assert "limit of 2 streams at once (router.max_grpc_streams)" in str(refused.value)
            assert refused.value.retry_after_s is not None
            assert next(iter(running[0])).final is None  # the running streams go on
        finally:
            running[1].cancel()

        def served() -> bool:
            try:
                return client.complete([30, 31], max_tokens=2).final.completion_tokens == 2
            except ResourceExhausted:  # the cancelled stream's slot is freed once the server has seen it go
                return False

        poll(served, "a call served once a stream ended", timeout=30, period=0.05)
        running[0].cancel()


def test_one_connection_runs_at_most_its_stream_cap_at_once(grpc_with: Start) -> None:
    grpc_port = grpc_with(max_streams_per_connection=1)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=SEPARATE) as first, \
            grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=SEPARATE) as second:
        health = health_pb2_grpc.HealthStub(first)
        watch = health.Watch(CHECK, timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # the one stream of `first`
        with pytest.raises(grpc.RpcError) as waited:
            health.Check(CHECK, timeout=1.0)  # the client holds the call back until a stream ends
        assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert health_pb2_grpc.HealthStub(second).Check(CHECK, timeout=10).status == 1  # another connection serves
        watch.cancel()
        assert health.Check(CHECK, timeout=10).status == health_pb2.HealthCheckResponse.SERVING


def test_a_connection_beyond_the_cap_is_refused(grpc_with: Start) -> None:
    grpc_port = grpc_with(max_grpc_connections=1)
    target = f"127.0.0.1:{grpc_port}"
    with grpc.insecure_channel(target, options=SEPARATE) as first:
        assert health_pb2_grpc.HealthStub(first).Check(CHECK, timeout=10).status == 1
        with grpc.insecure_channel(target, options=SEPARATE) as second:
            with pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(second).Check(CHECK, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    def served() -> bool:
        with grpc.insecure_channel(target, options=SEPARATE) as fresh:
            try:
                return health_pb2_grpc.HealthStub(fresh).Check(CHECK, timeout=10).status == 1
            except grpc.RpcError:
                return False

    poll(served, "a connection served once the first closed", timeout=30, period=0.1)


def test_a_grpc_connection_that_never_finishes_its_handshake_is_closed(grpc_with: Start) -> None:
    grpc_port = grpc_with(header_timeout_s=HEAD_TIMEOUT_S)
    with socket.create_connection(("127.0.0.1", grpc_port), timeout=10) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n")  # half of HTTP/2's connection preface
        assert HEAD_TIMEOUT_S * 0.8 <= seconds_until_closed(sock) < 5


def wait_for_state(channel: grpc.Channel, state: grpc.ChannelConnectivity, after: grpc.ChannelConnectivity) -> float:
    """Seconds until `channel` goes from `after` to `state` (10 s at most, else the test fails)."""
    reached = threading.Event()
    seen: list[grpc.ChannelConnectivity] = []

    def watch(now: grpc.ChannelConnectivity) -> None:
        seen.append(now)
        if now == state and after in seen:
            reached.set()

    start = time.monotonic()
    channel.subscribe(watch)
    try:
        assert reached.wait(10), seen
    finally:
        channel.unsubscribe(watch)
    return time.monotonic() - start


def test_an_idle_grpc_connection_is_closed_by_the_server(grpc_with: Start) -> None:
    grpc_port = grpc_with(grpc_idle_timeout_s=1.0)
    # The client's own idle timeout is 30 minutes: a channel back to IDLE within seconds was sent GOAWAY.
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=SEPARATE) as channel:
        assert health_pb2_grpc.HealthStub(channel).Check(CHECK, timeout=10).status == 1
        assert wait_for_state(channel, grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.READY) < 9


def test_an_old_grpc_connection_takes_no_new_calls_and_its_stream_goes_on(grpc_with: Start) -> None:
    grpc_port = grpc_with(grpc_max_connection_age_s=1.0, grpc_idle_timeout_s=0)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=SEPARATE) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(CHECK, timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        # A call is in progress, so no idle limit could close it: the GOAWAY is the age limit's.
        wait_for_state(channel, grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.READY)
        assert watch.is_active()  # the stream outlives its connection's age
        assert health.Check(CHECK, timeout=10).status == 1  # new calls go to a new connection
        watch.cancel()
