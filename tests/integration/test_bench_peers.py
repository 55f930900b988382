"""The serving benchmark's peer targets: plain vLLM OpenAI servers (one, or two behind the round-robin proxy),
and the OpenAI driver that measures them and pdserve's own HTTP frontend with the same client code."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from pdserve.config import EngineConfig
from pdserve_tools.bench.openai_driver import OpenAIDriver
from pdserve_tools.bench.peers import SERVED_MODEL, STARTUP_TIMEOUT_S, PeerStartError, vllm_disagg_example, vllm_openai
from pdserve_tools.bench.serve_metrics import RequestTrace
from pdserve_tools.bench.workload import BenchRequest
from tests.conftest import TINY_ENGINE, LoopThread, free_port

pytestmark = pytest.mark.integration

TEXT = BenchRequest("The quick brown fox jumps over the lazy dog", prompt_tokens=10, max_tokens=9)
IDS = BenchRequest(tuple(range(200, 333)), prompt_tokens=133, max_tokens=17)  # more than one KV block
LONG = BenchRequest(tuple(range(400, 700)), prompt_tokens=300, max_tokens=6)  # two whole blocks and more
TIMEOUT_S = 120.0


def engine(model: Path) -> EngineConfig:
    return EngineConfig(model=str(model), **TINY_ENGINE)


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


async def drive(url: str, model: str, requests: list[BenchRequest]) -> list[RequestTrace]:
    async with OpenAIDriver(url, model) as driver:
        return list(await asyncio.gather(*(driver.send(r, TIMEOUT_S) for r in requests)))


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        response.raise_for_status()
        return await response.json()


async def get_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        response.raise_for_status()
        return await response.text()


def assert_complete(trace: RequestTrace, request: BenchRequest) -> None:
    """A finished trace of `request`. Chunks are stamped as they are read: several that came in one read share a
    time, and a short stream may come whole, so the times only never go back."""
    assert trace.error is None, trace.error
    assert trace.output_tokens == request.max_tokens  # ignore_eos: every request runs to max_tokens
    assert trace.prompt_tokens == request.prompt_tokens
    assert trace.ttft > 0
    assert list(trace.chunk_times) == sorted(trace.chunk_times)
    assert trace.e2e >= trace.ttft


def server_processes() -> list[psutil.Process]:
    """The vLLM servers this test process started, with everything below them (EngineCore, its worker)."""
    found: list[psutil.Process] = []
    for child in psutil.Process().children():
        try:
            if "vllm.entrypoints.openai.api_server" in " ".join(child.cmdline()):
                found += [child, *child.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return found


def test_driver_reports_a_refused_connection_as_a_failed_trace(loop: LoopThread) -> None:
    (trace,) = loop.run(drive(f"http://127.0.0.1:{free_port()}/v1", SERVED_MODEL, [TEXT]))
    assert not trace.ok
    assert "cannot connect" in (trace.error or "")
    assert trace.chunk_times == ()


def test_a_server_that_cannot_start_raises_with_its_log(loop: LoopThread, tiny_model: Path, tmp_path: Path) -> None:
    async def start() -> None:
        async with vllm_openai(engine(tiny_model), str(tmp_path / "no-such-model"), 1, 1, tmp_path / "logs"):
            raise AssertionError("a server without a model came up")

    began = time.monotonic()
    with pytest.raises(PeerStartError) as failed:
        loop.run(start())
    assert time.monotonic() - began < STARTUP_TIMEOUT_S  # it exited: the deadline did not have to expire
    message = str(failed.value)
    assert "exited with code" in message
    assert str(tmp_path / "logs" / "vllm-0.log") in message
    assert "no-such-model" in message.split("last lines of", 1)[1]  # the log's own words about the model
    assert server_processes() == []


def test_two_servers_behind_the_proxy_share_requests_and_leave_no_process(
    loop: LoopThread, tiny_model: Path, tmp_path: Path
) -> None:
    async def run() -> tuple[list[RequestTrace], dict[str, Any], dict[str, float], list[psutil.Process]]:
        async with vllm_openai(engine(tiny_model), str(tiny_model), 2, 1, tmp_path) as url:
            traces = await drive(url, SERVED_MODEL, [TEXT, IDS, TEXT, IDS])
            upstreams = await get_json(url.removesuffix("/v1") + "/proxy/upstreams")
            served = {u["url"]: served_requests(await get_text(u["url"] + "/metrics"))
                      for u in upstreams["upstreams"]}
            return traces, upstreams, served, server_processes()

    traces, upstreams, served, started = loop.run(run())
    for trace, request in zip(traces, [TEXT, IDS, TEXT, IDS], strict=True):
        assert_complete(trace, request)
    assert [u["requests"] for u in upstreams["upstreams"]] == [2, 2]
    assert list(served.values()) == [2.0, 2.0]  # each vLLM counted its own two
    assert len(started) >= 4  # two servers, each with an engine process below it
    assert [p.pid for p in started if p.is_running()] == []


def served_requests(metrics: str) -> float:
    """vLLM's count of finished requests, over every finish reason."""
    return counter(metrics, "vllm:request_success_total")


def counter(metrics: str, name: str) -> float:
    """A Prometheus counter's total over its labels."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", re.MULTILINE)
    return sum(float(v) for v in pattern.findall(metrics))


def test_vllm_disaggregated_example_prefills_on_the_producer_and_loads_kv_on_the_consumer(
    loop: LoopThread, tiny_model: Path, tmp_path: Path
) -> None:
    async def run() -> tuple[list[RequestTrace], dict[str, Any], float, list[psutil.Process]]:
        async with vllm_disagg_example(engine(tiny_model), str(tiny_model), 1, tmp_path) as url:
            traces = await drive(url, SERVED_MODEL, [TEXT, LONG])
            upstreams = await get_json(url.removesuffix("/v1") + "/proxy/upstreams")
            consumer = upstreams["upstreams"][1]["url"]
            loaded = counter(await get_text(consumer + "/metrics"), "vllm:external_prefix_cache_hits_total")
            return traces, upstreams, loaded, server_processes()

    traces, upstreams, loaded, started = loop.run(run())
    for trace, request in zip(traces, [TEXT, LONG], strict=True):
        assert_complete(trace, request)
    assert [u["requests"] for u in upstreams["upstreams"]] == [2, 2]
    assert loaded == 256  # LONG's two whole blocks came from the producer's KV; TEXT's short prompt from none
    assert [p.pid for p in started if p.is_running()] == []
    assert list(tmp_path.glob("kv-store-*")) == []


@pytest.fixture(scope="module")
def one_server(loop: LoopThread, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    context = vllm_openai(engine(tiny_model), str(tiny_model), 1, 1, tmp_path_factory.mktemp("peer-logs"))
    url = loop.run(context.__aenter__())
    yield url
    loop.run(context.__aexit__(None, None, None))


def test_one_server_streams_text_and_token_id_prompts(loop: LoopThread, one_server: str) -> None:
    one_token = BenchRequest((5,), prompt_tokens=1, max_tokens=1)
    *traces, single = loop.run(drive(one_server, SERVED_MODEL, [TEXT, IDS, one_token]))
    for trace, request in zip(traces, [TEXT, IDS], strict=True):
        assert_complete(trace, request)
    assert single.ok and single.output_tokens == 1 and single.ttft > 0 and single.tpot is None
    # vLLM sends one event per engine step with that step's token ids: one token per chunk, no reconciliation.
    assert set(traces[0].chunk_tokens) == {1} and len(traces[0].chunk_times) == TEXT.max_tokens


def test_pdserve_http_frontend_answers_the_same_driver(loop: LoopThread, one_server: str, deployment: Any) -> None:
    base = f"http://127.0.0.1:{deployment.http_port}"
    model = loop.run(get_json(base + "/v1/models"))["data"][0]["id"]
    requests = [TEXT, IDS]
    theirs = loop.run(drive(base + "/v1", model, requests))
    ours = loop.run(drive(one_server, SERVED_MODEL, requests))
    for pd, plain, request in zip(theirs, ours, requests, strict=True):
        assert_complete(pd, request)
        assert pd.output_tokens == plain.output_tokens
