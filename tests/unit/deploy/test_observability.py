"""The observability files under deploy/ and the deployment guides' metric names.

The Grafana dashboard's PromQL is parsed (promql-parser) and every metric and grouping label it reads must be one
that the router's RouterMetrics exports; so must every `pdserve_*` metric the deployment READMEs tell an operator
to watch. Prometheus's sample config must scrape the router's metrics port.
"""

from __future__ import annotations

import json
import re
from functools import cache
from types import SimpleNamespace
from typing import Any

import promql_parser
import yaml

from pdserve.config import load_config
from router.metrics import RouterMetrics
from router.timings import PhaseTimings
from tests.unit.deploy.shipped import DEPLOY

DASHBOARD = DEPLOY / "grafana" / "pdserve-dashboard.json"
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": ".+"}


@cache
def exported() -> dict[str, frozenset[str]]:
    """Sample name -> label names, from a RouterMetrics that has ended one request of each kind, seen a KV
    transfer fail both ways and watches a pool of one instance."""
    metrics = RouterMetrics()
    metrics.finished("stop", 5, 3, PhaseTimings(prefill_compute=0.1, time_to_first_token=0.2, end_to_end=0.5))
    metrics.ended_early("cancelled")
    metrics.transferred(1024, ok=False)
    metrics.kv_transfer_failed("refused")
    instance = SimpleNamespace(instance_id="decode-0", role="decode", healthy=True, outstanding=0, stats=None)
    metrics.watch_pool(lambda: [instance], lambda: 0)
    labels: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(names) for name, names in labels.items()}


def query_problems(expr: str) -> list[str]:
    """Metrics the router does not export, and grouping labels missing from a metric the query reads."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    names: list[str] = []
    grouping: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            names.append(node.name)
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    problems = [f"{n} is not exported" for n in names if n not in exported()]
    problems += [f"{n} has no label {label}" for n in names if n in exported()
                 for label in sorted(grouping - exported()[n])]
    return problems


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(metric, label) is Grafana's, not PromQL: check the metric it reads.
            queries.append(re.fullmatch(r"label_values\((\w+), *\w+\)", variable["query"]["query"])[1])
    return queries


def test_every_dashboard_query_reads_exported_metrics_and_labels() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 12
    assert [p for q in queries for p in query_problems(q)] == []


def test_the_metric_check_catches_an_unknown_metric_or_label() -> None:
    assert query_problems("sum(rate(pdserve_requests_totl[$__rate_interval]))") == [
        "pdserve_requests_totl is not exported"]
    assert query_problems("sum by (phase) (rate(pdserve_requests_total[5m]))") == [
        "pdserve_requests_total has no label phase"]


def test_the_dashboard_shows_p50_and_p99_latencies_phases_outcomes_tokens_and_load() -> None:
    quantiles: set[tuple[float, str]] = set()
    for expr in dashboard_queries():
        tree = promql_parser.parse(expr.replace("$__rate_interval", "5m").replace("$job", ".+"))
        if isinstance(tree, promql_parser.Call) and tree.func.name == "histogram_quantile":
            quantiles.add((tree.args[0].val, re.search(r"pdserve_\w+_bucket", expr)[0]))
    for histogram in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
        for q in (0.5, 0.99):
            assert (q, f"pdserve_{histogram}_seconds_bucket") in quantiles
    assert (0.99, "pdserve_request_phase_seconds_bucket") in quantiles
    text = " ".join(dashboard_queries())
    for needle in ("by (outcome)", "pdserve_prompt_tokens_total", "pdserve_generation_tokens_total",
                   "pdserve_requests_running", "pdserve_request_phase_seconds_sum"):
        assert needle in text


def test_the_dashboard_shows_the_prefix_cache_hit_rate_and_the_prefill_tokens_it_saved() -> None:
    queries = dashboard_queries()
    assert any("pdserve_prefix_blocks_hit_total" in q and "pdserve_prefix_blocks_routed_total" in q for q in queries)
    assert any("pdserve_prefix_saved_prefill_tokens_total" in q for q in queries)


def test_prometheus_scrapes_the_router_metrics_port_on_this_host() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "pdserve-router"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"127.0.0.1:{load_config().router.metrics_port}"]


def test_every_metric_the_deployment_guides_name_is_exported() -> None:
    for readme in sorted(DEPLOY.glob("**/README.md")):
        names = set(re.findall(r"\bpdserve_[a-z0-9_]+", readme.read_text()))
        assert names - set(exported()) == set(), readme.relative_to(DEPLOY)
