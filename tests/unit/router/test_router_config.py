"""`RouterConfig`'s frontend limits: refused when they make no sense, and /metrics local unless asked otherwise."""

from __future__ import annotations

import re
import urllib.request

import pytest

from router.config import RouterConfig, SloConfig
from router.metrics import RouterMetrics, serve_metrics


@pytest.mark.parametrize(("field", "value", "message"), [
    ("header_timeout_s", 0.0, "router.header_timeout_s must be > 0 seconds"),
    ("body_timeout_s", -1.0, "router.body_timeout_s must be > 0 seconds"),
    ("max_http_connections", 0, "router.max_http_connections must be >= 1"),
    ("max_grpc_connections", 0, "router.max_grpc_connections must be >= 1"),
    ("max_grpc_streams", 0, "router.max_grpc_streams must be >= 1"),
    ("max_streams_per_connection", 0, "router.max_streams_per_connection must be >= 1"),
    ("grpc_idle_timeout_s", -1.0, "router.grpc_idle_timeout_s must be >= 0 seconds (0: no limit)"),
    ("grpc_max_connection_age_s", float("nan"), "router.grpc_max_connection_age_s must be >= 0 seconds"),
    ("split_policy", "never", "router.split_policy must be one of ['always', 'sooner'], got 'never'"),
    ("shed", True, "router.shed refuses requests projected to miss router.slo.ttft_s: set slo.ttft_s too"),
])
def test_a_limit_out_of_range_is_refused_naming_the_key(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        RouterConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("ttft_s", 0.0, "router.slo.ttft_s must be > 0 s (or null: unchecked), got 0.0"),
    ("tpot_ms", -5.0, "router.slo.tpot_ms must be > 0 ms (or null: unchecked), got -5.0"),
])
def test_an_objective_that_cannot_be_met_is_refused_naming_the_key(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SloConfig(**{field: value})


def test_the_objectives_and_shedding_parse_from_yaml() -> None:
    from pdserve.config import config_from_dict

    router = config_from_dict({"router": {"slo": {"ttft_s": 2.0, "tpot_ms": 150}, "shed": True}}).router
    assert (router.slo, router.shed) == (SloConfig(ttft_s=2.0, tpot_ms=150.0), True)
    with pytest.raises(ValueError, match=r"router\.slo\.ttft_ms\n  Unexpected keyword argument"):
        config_from_dict({"router": {"slo": {"ttft_ms": 2000}}})


def test_metrics_listen_on_loopback_by_default() -> None:
    config = RouterConfig(host="0.0.0.0")
    server, port = serve_metrics(RouterMetrics(), config.metrics_host, 0)
    try:
        assert server.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert b"pdserve_event_loop_lag_seconds" in reply.read()
    finally:
        server.shutdown()
