"""The request channel's protocol, with a small in-process worker in place of an engine (the integration tests run
it against real workers): chunks in order, results, errors, the secret, cancellation reaching the worker, and a
worker that goes away mid-call."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from common.channel import LENGTH, MAX_FRAME, MAX_PROOF_FRAME, fields, frame, read_frame
from common.errors import EngineFailure
from common.results import EngineChunk, PrefillResult
from common.sampling import SamplingSpec
from router.channel import WorkerChannel, WorkerGone
from worker.channel_server import Call, ChannelServer, serve

SECRET = "s3cret"
SAMPLING = SamplingSpec(4)


class Worker:
    """Streams `prompt` back one token per chunk; a prompt [-1] fails, a prompt [-2] never ends."""

    def __init__(self) -> None:
        self.started: asyncio.Event = asyncio.Event()
        self.cancelled: asyncio.Event = asyncio.Event()

    async def generate(self, request_id: str, prompt: list[int], sampling: SamplingSpec,
                       kv: dict[str, Any] | None) -> AsyncIterator[EngineChunk]:
        if prompt == [-1]:
            raise RuntimeError("the engine broke")
        self.started.set()
        try:
            if prompt == [-2]:
                yield EngineChunk([0])
                await asyncio.Event().wait()
            for i, token in enumerate(prompt):
                yield EngineChunk([token], finish_reason="length" if i == len(prompt) - 1 else None)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def generate_call(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        async for chunk in self.generate(call.request_id, call.prompt_token_ids, call.sampling, call.kv_params):
            yield {"chunk": fields(chunk)}

    async def prefill_call(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        yield {"result": fields(PrefillResult([call.prompt_token_ids[0] + 1], None, 0.0, 0.01))}


async def _with_server(body: Any) -> Any:
    worker = Worker()
    server, address = await serve({"Generate": worker.generate_call, "Prefill": worker.prefill_call}, "127.0.0.1",
                                  SECRET)
    try:
        return await body(worker, server, WorkerChannel(address, SECRET), address)
    finally:
        await server.stop()


def run(body: Any) -> Any:
    return asyncio.run(_with_server(body))


def test_generate_streams_every_chunk_in_order_and_prefill_returns_its_result() -> None:
    async def body(worker: Worker, server: ChannelServer, channel: WorkerChannel, address: str) -> None:
        stream = channel.generate("r1", [5, 6, 7], SAMPLING)
        chunks = [await stream.next() for _ in range(3)]
        assert [c.token_ids for c in chunks] == [[5], [6], [7]] and chunks[-1].finish_reason == "length"
        result = await channel.prefill("r2", [41], SAMPLING, {})
        assert result.token_ids == [42]

    run(body)


def test_a_failure_in_the_engine_is_an_engine_failure_not_a_lost_worker() -> None:
    async def body(worker: Worker, server: ChannelServer, channel: WorkerChannel, address: str) -> None:
        with pytest.raises(EngineFailure, match="INTERNAL: the engine failed while running request r1; see the "
                                                "worker's log") as e:
            await channel.generate("r1", [-1], SAMPLING).next()
        assert not isinstance(e.value, WorkerGone)
        assert "RuntimeError" not in str(e.value) and "the engine broke" not in str(e.value)  # only in the log
        assert [c.token_ids for c in [await channel.generate("r2", [3], SAMPLING).next()]] == [[3]]

    run(body)


def test_only_callers_holding_the_secret_are_served() -> None:
    async def body(worker: Worker, server: ChannelServer, channel: WorkerChannel, address: str) -> None:
        with pytest.raises(EngineFailure, match="UNAUTHENTICATED: calls to a worker need the cluster secret"):
            await WorkerChannel(address, "wrong").generate("r1", [1], SAMPLING).next()
        host, _, port = address.rpartition(":")
        for answer in ({"proof": "00" * 32}, {"secret": SECRET}, {"method": "Generate"}):  # a wrong HMAC, no HMAC
            reader, writer = await asyncio.open_connection(host, int(port))
            await read_frame(reader)
            writer.write(frame(answer))
            assert (await read_frame(reader))["error"]["code"] == "UNAUTHENTICATED"
            assert await asyncio.wait_for(reader.read(), 5.0) == b""  # and the connection closes
            writer.close()
        assert not worker.started.is_set()

    run(body)


def test_an_unauthenticated_peer_cannot_make_the_worker_read_a_big_frame() -> None:
    async def body(worker: Worker, server: ChannelServer, channel: WorkerChannel, address: str) -> None:
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        await read_frame(reader)  # the challenge
        writer.write(LENGTH.pack(MAX_FRAME))  # announces 64 MiB, sends none of it
        assert await asyncio.wait_for(reader.read(), 5.0) == b""  # closed unread, not waiting for the body
        writer.close()
        reader, writer = await asyncio.open_connection(host, int(port))
        await read_frame(reader)
        writer.write(LENGTH.pack(MAX_PROOF_FRAME + 1))
        assert await asyncio.wait_for(reader.read(), 5.0) == b""
        writer.close()

    run(body)


def test_the_secret_never_travels_and_a_pooled_connection_proves_it_once() -> None:
    sent: list[bytes] = []

    async def body(worker: Worker, server: ChannelServer, channel: WorkerChannel, address: str) -> None:
        async def relay(src: asyncio.StreamReader, dst: asyncio.StreamWriter, log: list[bytes] | None) -> None:
            while data := await src.read(65536):
                if log is not None:
                    log.append(data)
                dst.write(data)
            dst.close()

        async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            host, _, port = address.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            await asyncio.gather(relay(reader, up_writer, sent), relay(up_reader, writer, None))

        relay_server = await asyncio.start_server(proxy, "127.0.0.1", 0)
        via = WorkerChannel(f"127.0.0.1:{relay_server.sockets[0].getsockname()[1]}", SECRET)
        for i in range(2):
            assert (await via.generate(f"r{i}", [7], SAMPLING).next()).token_ids == [7]
        await via.close()
        relay_server.close()
        wire = b"".join(sent)
        assert SECRET.encode() not in wire and b"secret" not in wire
        assert wire.count(b'"proof"') == 1 and wire.count(b'"Generate"') == 2
        assert server.connections == 1

    run(body)


def test_connections_beyond_the_cap_are_closed_at_once(monkeypatch) -> None:
    monkeypatch.setattr("worker.channel_server.MAX_CONNECTIONS", 1)

    async def body(worker: Worker, server: ChannelServer, channel: WorkerChannel, address: str) -> None:
        host, _, port = address.rpartition(":")
        first = await asyncio.open_connection(host, int(port))
        assert "nonce" in await read_frame(first[0])
        second = await asyncio.open_connection(host, int(port))
        assert await asyncio.wait_for(second[0].read(), 5.0) == b""  # no challenge: closed on arrival
        for _, writer in (first, second):
            writer.close()

    run(body)


def test_cancel_stops_the_call_in_the_worker() -> None:
    async def body(worker: Worker, server: ChannelServer, channel: WorkerChannel, address: str) -> None:
        stream = channel.generate("r1", [-2], SAMPLING)
        assert (await stream.next()).token_ids == [0]
        stream.cancel()
        await asyncio.wait_for(worker.cancelled.wait(), 5.0)
        with pytest.raises(EngineFailure, match="ended"):
            await stream.next()

    run(body)


def test_a_caller_giving_up_on_a_read_stops_the_call_too() -> None:
    async def body(worker: Worker, server: ChannelServer, channel: WorkerChannel, address: str) -> None:
        stream = channel.generate("r1", [-2], SAMPLING)
        await stream.next()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stream.next(), 0.05)  # the router's deadline passing mid-read
        stream.cancel()
        await asyncio.wait_for(worker.cancelled.wait(), 5.0)

    run(body)


def test_a_worker_that_goes_away_mid_stream_or_is_not_there_is_a_lost_worker() -> None:
    async def body(worker: Worker, server: ChannelServer, channel: WorkerChannel, address: str) -> None:
        stream = channel.generate("r1", [-2], SAMPLING)
        await stream.next()
        await server.stop()
        with pytest.raises(WorkerGone, match="broke"):
            await stream.next()
        with pytest.raises(WorkerGone, match="cannot be reached"):
            await channel.generate("r2", [1], SAMPLING).next()

    run(body)


def test_garbage_and_oversized_frames_are_dropped_and_the_worker_goes_on() -> None:
    async def body(worker: Worker, server: ChannelServer, channel: WorkerChannel, address: str) -> None:
        host, _, port = address.rpartition(":")
        for raw in (LENGTH.pack(MAX_FRAME + 1), LENGTH.pack(5) + b"{nope", LENGTH.pack(3) + json.dumps([1]).encode()):
            reader, writer = await asyncio.open_connection(host, int(port))
            assert "nonce" in await read_frame(reader)
            writer.write(raw)
            answer = await asyncio.wait_for(reader.read(), 5.0)  # then the worker closes the connection
            assert answer == b"" or b"UNAUTHENTICATED" in answer, answer
            writer.close()
        assert not worker.started.is_set()
        stream = channel.generate("r1", [9], SAMPLING)
        assert (await stream.next()).token_ids == [9]

    run(body)


def test_calls_one_after_another_share_one_connection() -> None:
    async def body(worker: Worker, server: ChannelServer, channel: WorkerChannel, address: str) -> None:
        for i in range(3):
            stream = channel.generate(f"g{i}", [5, 6], SAMPLING)
            assert [(await stream.next()).token_ids for _ in range(2)] == [[5], [6]]
            assert (await channel.prefill(f"p{i}", [i], SAMPLING, {})).token_ids == [i + 1]
        assert server.connections == 1

    run(body)


def test_a_cancelled_or_failed_call_s_connection_is_not_used_again() -> None:
    async def body(worker: Worker, server: ChannelServer, channel: WorkerChannel, address: str) -> None:
        stream = channel.generate("r1", [-2], SAMPLING)
        await stream.next()
        stream.cancel()
        await asyncio.wait_for(worker.cancelled.wait(), 5.0)
        with pytest.raises(EngineFailure, match="the engine failed while running request r2"):
            await channel.generate("r2", [-1], SAMPLING).next()
        assert (await channel.generate("r3", [4], SAMPLING).next()).token_ids == [4]
        assert server.connections == 3

    run(body)


def test_concurrent_calls_each_have_a_connection_and_the_idle_ones_are_capped(monkeypatch) -> None:
    monkeypatch.setattr("router.channel.MAX_IDLE", 2)

    async def three(channel: WorkerChannel, tag: str) -> list[list[int]]:
        streams = [channel.generate(f"{tag}{i}", [i, i], SAMPLING) for i in range(3)]
        firsts = [(await s.next()).token_ids for s in streams]  # all three open at once
        return firsts + [(await s.next()).token_ids for s in streams]

    async def body(worker: Worker, server: ChannelServer, channel: WorkerChannel, address: str) -> None:
        assert await three(channel, "a") == [[0], [1], [2]] * 2
        assert server.connections == 3
        assert await three(channel, "b") == [[0], [1], [2]] * 2
        assert server.connections == 4  # two kept idle, one opened

    run(body)


def test_an_idle_connection_to_a_worker_that_stopped_is_a_lost_worker() -> None:
    async def body(worker: Worker, server: ChannelServer, channel: WorkerChannel, address: str) -> None:
        assert (await channel.generate("r1", [1], SAMPLING).next()).token_ids == [1]
        await server.stop()
        with pytest.raises(WorkerGone, match=f"the worker at {address}"):
            await channel.generate("r2", [1], SAMPLING).next()
        await channel.close()

    run(body)
