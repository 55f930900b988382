"""A real Prometheus server scrapes a running deployment with the shipped scrape config.

`make test` installs Debian's `prometheus` package (the server and `promtool`) when it is missing. The server
runs as a child of the test, on a free loopback port, with its storage in the test's temporary folder; only the
scrape target (the deployment's metrics port) and the interval (1 s, so the test is quick) differ from
`deploy/prometheus/prometheus.yml`. A request sent through the SDK must then show in what Prometheus answers
to PromQL queries, with the request's own token count and latency.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pdserve_client import AsyncClient, Client
from tests.conftest import free_port, poll

pytestmark = pytest.mark.integration

SCRAPE_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "prometheus.yml"
JOB = "pdserve-router"  # the job name of the shipped config, which dashboards and alerts select on


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed: `make test` installs it (apt-get install prometheus)")
    return path


class Prometheus:
    """A Prometheus server process and its HTTP API."""

    def __init__(self, config: Path, storage: Path, log: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={storage}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.log = log

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.log.read_text()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector that `promql` evaluates to now."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        return list(body["data"]["result"])

    def value(self, promql: str) -> float | None:
        """The single sample `promql` selects, or None while it selects none."""
        result = self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        self._log.close()


@pytest.fixture(scope="module")
def prometheus(deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    folder = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    job["scrape_interval"] = "1s"
    (static,) = job["static_configs"]
    static["targets"] = [f"127.0.0.1:{deployment.metrics_port}"]
    config["global"]["scrape_interval"] = "1s"
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    server = Prometheus(folder / "prometheus.yml", folder / "data", folder / "prometheus.log")
    try:
        poll(server.ready, "prometheus to be ready")
        poll(lambda: server.value(f'up{{job="{JOB}"}}') == 1, "the router's metrics to be scraped")
        yield server
    finally:
        server.stop()


def scraped_now(deployment) -> dict[str, float]:
    """The router's samples, read straight from its /metrics endpoint, by name (labels rendered as PromQL)."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{deployment.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def test_shipped_scrape_config_is_valid():
    done = subprocess.run(
        [tool("promtool"), "check", "config", str(SCRAPE_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_router_metrics_pass_promtool_lint(deployment):
    url = f"http://127.0.0.1:{deployment.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read()
    assert b"pdserve_requests_running" in text
    done = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=text, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


def test_a_request_shows_in_prometheus(prometheus, deployment):
    requests = 'pdserve_requests_total{outcome="length"}'
    counters = [
        requests,
        "pdserve_generation_tokens_total",
        "pdserve_prompt_tokens_total",
        "pdserve_e2e_request_latency_seconds_count",
        "pdserve_e2e_request_latency_seconds_sum",
        "pdserve_inter_token_latency_seconds_count",
    ]

    def when_idle() -> dict[str, float] | None:
        samples = scraped_now(deployment)
        return samples if samples["pdserve_requests_running"] == 0 else None

    # Requests of earlier tests (cancelled streams, say) end before the baseline is read.
    before = poll(when_idle, "the deployment to have no request running")
    base = {name: before.get(name, 0.0) for name in counters}

    with Client(deployment.target) as client:
        done = client.complete([21, 22, 23, 24, 25, 26], max_tokens=5, temperature=0.0, ignore_eos=True, timeout=120)
    assert done.final.finish_reason == "length" and done.final.completion_tokens == 5

    def in_prometheus(name: str) -> float | None:
        # The shipped config's job and its `component` label, as the dashboards select them.
        selector = f'job="{JOB}",component="router"'
        promql = name.replace("{", "{" + selector + ",") if "{" in name else f"{name}{{{selector}}}"
        return prometheus.value(promql)

    def all_moved() -> dict[str, float] | None:
        now = {name: in_prometheus(name) for name in counters}
        moved = all(v is not None and v != base[name] for name, v in now.items())
        return {name: v for name, v in now.items() if v is not None} if moved else None

    seen = poll(all_moved, "prometheus to scrape the request's metrics")
    assert seen[requests] == base[requests] + 1
    assert seen["pdserve_generation_tokens_total"] == base["pdserve_generation_tokens_total"] + 5
    assert seen["pdserve_prompt_tokens_total"] == base["pdserve_prompt_tokens_total"] + 6
    assert seen["pdserve_e2e_request_latency_seconds_count"] == base["pdserve_e2e_request_latency_seconds_count"] + 1
    assert seen["pdserve_e2e_request_latency_seconds_sum"] - base["pdserve_e2e_request_latency_seconds_sum"] == (
        pytest.approx(done.final.timings.end_to_end, rel=1e-6, abs=1e-6)
    )
    # PromQL over the scraped histogram works as the dashboard uses it.
    quantile = prometheus.value(
        f'histogram_quantile(0.5, sum by (le) (pdserve_e2e_request_latency_seconds_bucket{{job="{JOB}"}}))'
    )
    assert quantile is not None and 0 < quantile <= 300
    # 5 tokens leave in 2 to 5 messages: 1 to 4 gaps between them.
    gaps = seen["pdserve_inter_token_latency_seconds_count"] - base["pdserve_inter_token_latency_seconds_count"]
    assert 1 <= gaps <= 4
    # The pool's gauges: every instance in the pool, its engine's KV usage a share.
    instances = len(deployment.router.registry.all())
    assert prometheus.value(f'sum(pdserve_instance_healthy{{job="{JOB}"}})') == instances
    usage = prometheus.query(f'pdserve_instance_kv_cache_usage_ratio{{job="{JOB}"}}')
    assert len(usage) == instances and all(0 <= float(u["value"][1]) <= 1 for u in usage)
    # Each worker actor's event-loop lag, sampled by the worker and carried by its heartbeats.
    lag = prometheus.query(f'pdserve_worker_event_loop_lag_seconds_count{{job="{JOB}"}}')
    assert len(lag) == instances and all(float(s["value"][1]) > 0 for s in lag)


def test_every_instance_exports_its_engine_step_times(prometheus, deployment):
    instances = len(deployment.router.registry.all())

    async def load() -> list[Any]:
        # Twice as many requests as instances at once, 32 steps each: least_outstanding gives every instance some.
        async with AsyncClient(deployment.target) as client:
            return await asyncio.gather(*(client.complete([31, 32, 33, 34 + i], max_tokens=32, temperature=0.0,
                                                          ignore_eos=True, timeout=120) for i in range(2 * instances)))

    assert all(done.final.completion_tokens == 32 for done in asyncio.run(load()))

    # Each engine's step times, timed by its worker from the engine's reports and carried by its heartbeats.
    def stepped() -> list[dict[str, Any]] | None:
        steps = prometheus.query(f'pdserve_engine_step_seconds_count{{job="{JOB}"}}')
        return steps if len(steps) == instances and all(float(s["value"][1]) > 0 for s in steps) else None

    poll(stepped, "every instance to export engine step times")
    total = prometheus.value(f'sum(pdserve_engine_step_seconds_sum{{job="{JOB}"}})')
    assert total is not None and total > 0
