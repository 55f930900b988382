"""Prometheus metrics of the router: request latencies, per-phase timings, outcomes, tokens, load.

Prefix reuse: of the prompts placed on instances whose engines cache prefixes, the full KV blocks routed, those
found in the chosen instance's tracked prefix cache (`router.placement.tracked`; hit rate = hit / routed), and the
prompt tokens that saves the engine computing.

Names follow Prometheus conventions (`pdserve_` prefix, `_seconds`, `_total`). Each `RouterMetrics` owns its
registry, so several routers (tests) never collide; `serve_metrics` exposes one over HTTP. `watch_pool` adds the
gauges read at scrape time: per instance its health, outstanding requests, the engine's queue and KV usage, and the
worker's event-loop lag and engine step times as histograms (as of its last heartbeat), and the requests waiting
for admission.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from common.loop_lag import LAG_BUCKETS
from router.placement.tracked import PrefixHit
from router.timings import PhaseTimings

# Latencies of a CPU-served small model span milliseconds to minutes.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
_RELATIVE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)
_PHASES = ("router_queue", "prefill_queue", "prefill_compute", "kv_transfer", "decode_queue",
           "first_decode_step", "decode")


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("pdserve_time_to_first_token_seconds", "Arrival at the router to first token sent",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("pdserve_time_per_output_token_seconds",
                              "(end-to-end - TTFT) / (completion tokens - 1), requests of 2+ tokens",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pdserve_inter_token_latency_seconds",
                             "Between two consecutive messages of tokens sent on a stream",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("pdserve_e2e_request_latency_seconds", "Arrival at the router to last token sent",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.phase = Histogram("pdserve_request_phase_seconds", "Seconds a finished request spent in each phase",
                               ["phase"], buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("pdserve_requests", "Requests that ended, by outcome (finish reason or status)",
                                ["outcome"], registry=r)
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("pdserve_generation_tokens", "Tokens generated for finished requests",
                                         registry=r)
        self.kv_bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes that landed on decode instances",
                                registry=r)
        self.kv_transfers = Counter("pdserve_kv_transfers", "KV transfers that ended, by result (ok, failed: the "
                                    "decode instance recomputed the prompt)", ["result"], registry=r)
        self.kv_failures = Counter("pdserve_kv_transfer_failures", "KV transfers that could not start (the prefill "
                                   "could not reach the decode instance, which prefilled the prompt itself), by "
                                   "reason", ["reason"], registry=r)
        self.loop_lag = Histogram("pdserve_event_loop_lag_seconds", "How late the router's event loop woke a "
                                  "timer (sampled every 0.1 s): what every stream it serves waited extra",
                                  buckets=LAG_BUCKETS, registry=r)
        self.legs = Counter("pdserve_legs", "Legs placed on decode instances, by path: split (prefilled on a "
                            "prefill instance) or whole (prefilled on the decode instance itself)", ["path"],
                            registry=r)
        self.shed = Counter("pdserve_requests_shed", "Requests refused before they ran: their first token was "
                            "projected later than router.slo.ttft_s (router.shed)", registry=r)
        self.resumed = Counter("pdserve_requests_resumed", "Times a request moved to another instance after its "
                               "worker was lost", registry=r)
        self.running = Gauge("pdserve_requests_running", "Requests placed on an instance and not ended",
                             registry=r)
        self.held = Gauge("pdserve_requests_held", "Requests waiting for KV room on a decode instance (length-aware "
                          "placement)", registry=r)
        self.length_error = Histogram("pdserve_output_length_error_tokens", "|output tokens - predicted p50| of "
                                      "finished requests", buckets=_TOKEN_BUCKETS, registry=r)
        self.length_relative_error = Histogram("pdserve_output_length_relative_error", "|output tokens - "
                                               "predicted p50| / output tokens of finished requests",
                                               buckets=_RELATIVE_BUCKETS, registry=r)
        self.length_coverage = Counter("pdserve_output_length_within_prediction", "Finished requests by predicted "
                                       "quantile (p50, p90) and whether their output ended at or below it (within) "
                                       "or past it (beyond)", ["quantile", "result"], registry=r)
        self.prefix_blocks_routed = Counter("pdserve_prefix_blocks_routed", "Full KV blocks of the prompts placed on "
                                            "instances that cache prefixes", registry=r)
        self.prefix_blocks_hit = Counter("pdserve_prefix_blocks_hit", "Of those blocks, the ones the chosen "
                                         "instance held already (leading blocks of its prompt, as the router "
                                         "tracks its prefix cache)", registry=r)
        self.prefill_tokens_saved = Counter("pdserve_prefix_saved_prefill_tokens", "Prompt tokens an instance "
                                            "did not compute because its prefix cache held them", registry=r)

    def predicted(self, p50: int, p90: int, generated: int) -> None:
        """A finished request's output length against its predicted quantiles."""
        error = abs(generated - p50)
        self.length_error.observe(error)
        self.length_relative_error.observe(error / max(generated, 1))
        for quantile, bound in (("p50", p50), ("p90", p90)):
            self.length_coverage.labels(quantile, "within" if generated <= bound else "beyond").inc()

    def finished(self, finish_reason: str, prompt_tokens: int, completion_tokens: int, t: PhaseTimings) -> None:
        self.requests.labels(finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.ttft.observe(t.time_to_first_token)
        self.e2e.observe(t.end_to_end)
        if completion_tokens > 1:
            self.tpot.observe((t.end_to_end - t.time_to_first_token) / (completion_tokens - 1))
        values = dataclasses.asdict(t)
        for phase in _PHASES:
            self.phase.labels(phase).observe(values[phase])

    def prefix_routed(self, hit: PrefixHit) -> None:
        """A prompt placed on an instance that caches prefixes, and what that instance held of it."""
        self.prefix_blocks_routed.inc(hit.blocks)
        self.prefix_blocks_hit.inc(hit.hit)
        self.prefill_tokens_saved.inc(hit.saved_tokens)

    def transferred(self, nbytes: int, ok: bool) -> None:
        self.kv_transfers.labels("ok" if ok else "failed").inc()
        self.kv_bytes.inc(nbytes)

    def kv_transfer_failed(self, reason: str) -> None:
        """A prefill reported that its KV will not reach the decode instance (`router.kv_fallback`)."""
        self.kv_failures.labels(reason).inc()

    def ended_early(self, outcome: str) -> None:
        """A request that did not finish: a gRPC status name, or "cancelled" when the client went away."""
        self.requests.labels(outcome).inc()


    def watch_pool(self, instances: Callable[[], list[Any]], admission_waiting: Callable[[], int]) -> None:
        """Registers the pool's gauges: `instances()` returns the registry's `Instance`s at scrape time."""
        self.registry.register(_PoolCollector(instances, admission_waiting))


class _PoolCollector(Collector):
    def __init__(self, instances: Callable[[], list[Any]], admission_waiting: Callable[[], int]) -> None:
        self._instances = instances
        self._admission_waiting = admission_waiting

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        labels = ["instance", "role"]
        healthy = GaugeMetricFamily("pdserve_instance_healthy", "1 while the instance is in the pool", labels=labels)
        outstanding = GaugeMetricFamily("pdserve_instance_outstanding_requests",
                                        "Requests the router placed on the instance and that have not ended",
                                        labels=labels)
        waiting = GaugeMetricFamily("pdserve_instance_waiting_requests",
                                    "Requests queued in the instance's engine (last heartbeat)", labels=labels)
        kv = GaugeMetricFamily("pdserve_instance_kv_cache_usage_ratio",
                               "Share of the instance's KV blocks in use, 0 to 1 (last heartbeat)", labels=labels)
        preempted = CounterMetricFamily("pdserve_instance_preemptions", "Requests the instance's engine preempted "
                                        "because its KV blocks ran out (last heartbeat)", labels=labels)
        lag = HistogramMetricFamily("pdserve_worker_event_loop_lag_seconds", "How late the worker actor's event "
                                    "loop woke a timer (sampled every 0.1 s; as of the last heartbeat): what each "
                                    "stream it serves waited extra", labels=labels)
        steps = HistogramMetricFamily("pdserve_engine_step_seconds", "Wall time of each step of the instance's "
                                      "engine that ran the model: scheduling, forward, sampling, output bookkeeping "
                                      "(engine clock; as of the last heartbeat)", labels=labels)
        for i in self._instances():
            key = [i.instance_id, i.role]
            healthy.add_metric(key, float(i.healthy))
            outstanding.add_metric(key, float(i.outstanding))
            if i.stats is not None:
                waiting.add_metric(key, float(i.stats.waiting))
                kv.add_metric(key, float(i.stats.kv_cache_usage))
                preempted.add_metric(key, float(i.stats.preemptions))
                if (h := i.stats.loop_lag) is not None:
                    lag.add_metric(key, h.buckets(), h.total)
                if (h := i.stats.step_time) is not None:
                    steps.add_metric(key, h.buckets(), h.total)
        queue = GaugeMetricFamily("pdserve_admission_waiting_requests",
                                  "Requests waiting for an admission slot (router.max_outstanding)")
        queue.add_metric([], float(self._admission_waiting()))
        yield from (healthy, outstanding, waiting, kv, preempted, lag, steps, queue)


def serve_metrics(metrics: RouterMetrics, host: str, port: int) -> tuple[Any, int]:
    """Starts the /metrics HTTP endpoint on a thread; returns the server (call `shutdown()`) and its port."""
    server, _ = start_http_server(port, addr=host, registry=metrics.registry)
    return server, server.server_port
