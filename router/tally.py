"""`Tally`: one request's deltas as the metrics see them. Every request that ends is counted exactly once, by
how it ended: finished (by finish reason, with its token counts and phase timings), failed (by the gRPC status
of its `ServeError`), or cancelled (its consumer went away first); and the gap between consecutive messages
of tokens is an inter-token latency."""

from __future__ import annotations

import time

from common.errors import ServeError
from router.delta import Delta
from router.metrics import RouterMetrics


class Tally:
    def __init__(self, metrics: RouterMetrics) -> None:
        self.metrics = metrics
        self._ended = False
        self._last_tokens = 0.0  # when the previous message of tokens went out

    def sent(self, delta: Delta) -> None:
        """`delta` is about to go out."""
        if delta.token_ids:
            now = time.monotonic()
            if self._last_tokens:
                self.metrics.itl.observe(now - self._last_tokens)
            self._last_tokens = now
        if delta.outcome is not None:
            o = delta.outcome
            self.metrics.finished(o.finish_reason, o.prompt_tokens, o.completion_tokens, o.timings)
            self._ended = True

    def failed(self, error: ServeError) -> None:
        self.metrics.ended_early(error.status)
        self._ended = True

    def close(self) -> None:
        """The request's stream is over: one that neither finished nor failed was cancelled."""
        if not self._ended:
            self.metrics.ended_early("cancelled")
