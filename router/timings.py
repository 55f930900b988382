"""Per-phase timings of one request, derived from a handful of timestamps. Pure code.

All router-side timestamps are `time.monotonic()` of the router process; engine queue and compute times and
the KV wait are durations measured inside one engine, so no clock is compared across processes or nodes.

Disaggregated request, as the router sees it:

    arrival -> dispatched -> [prefill engine: queue, compute] -> first token (prefill returned)
            -> decode dispatched -> [decode engine: wait for KV, queue, first step] -> second token -> last token

`kv_transfer` is the time the decode engine waited for KV that had not landed yet (the transfer not hidden
behind the prefill); router overhead between the phases is counted in the queue phase that follows it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PhaseTimings:
    router_queue: float = 0.0
    prefill_queue: float = 0.0
    prefill_compute: float = 0.0
    kv_transfer: float = 0.0
    decode_queue: float = 0.0
    first_decode_step: float = 0.0
    decode: float = 0.0
    time_to_first_token: float = 0.0
    end_to_end: float = 0.0
    kv_transfer_failure: str = ""  # why the KV did not reach the decode instance (it prefilled itself); "": it did


@dataclass(slots=True)
class Clock:
    """Timestamps of one request as the router sees it (seconds, router monotonic clock)."""

    arrival: float
    dispatched: float = 0.0
    first_token: float = 0.0
    second_token: float = 0.0
    last_token: float = 0.0
    prefill_compute: float = 0.0
    prefill_queue: float = 0.0  # engine-measured, disaggregated requests
    decode_dispatched: float = 0.0
    kv_wait: float = 0.0  # engine-measured wait for KV on the decode side
    decode_compute: float = 0.0  # engine-measured: decode request scheduled -> its first token

    def tokens_arrived(self, now: float, count: int) -> None:
        if count <= 0:
            return
        if not self.first_token:
            self.first_token = now
            if count > 1:
                self.second_token = now
        elif not self.second_token:
            self.second_token = now
        self.last_token = now

    def colocated(self, finished: float) -> PhaseTimings:
        """Timings of a request that one instance ran whole: no transfer, no separate decode queue."""
        first = self.first_token or finished
        second = self.second_token or first
        last = self.last_token or first
        to_first = max(0.0, first - self.dispatched)
        compute = min(self.prefill_compute, to_first)
        return PhaseTimings(
            router_queue=max(0.0, self.dispatched - self.arrival),
            prefill_queue=to_first - compute,
            prefill_compute=compute,
            first_decode_step=max(0.0, second - first),
            decode=max(0.0, last - second),
            time_to_first_token=max(0.0, first - self.arrival),
            end_to_end=max(0.0, finished - self.arrival),
        )

    def disaggregated(self, finished: float) -> PhaseTimings:
        """Timings of a request prefilled on one instance and decoded on another."""
        first = self.first_token or finished
        second = self.second_token or first
        last = self.last_token or first
        compute = min(self.prefill_compute, max(0.0, first - self.dispatched))
        decode_start = self.decode_dispatched or first
        to_second = max(0.0, second - decode_start)
        kv = min(self.kv_wait, to_second)
        step = min(self.decode_compute, to_second - kv)
        return PhaseTimings(
            router_queue=max(0.0, self.dispatched - self.arrival),
            prefill_queue=max(0.0, first - self.dispatched - compute),
            prefill_compute=compute,
            kv_transfer=kv,
            decode_queue=max(0.0, decode_start - first) + max(0.0, to_second - kv - step),
            first_decode_step=step,
            decode=max(0.0, last - second),
            time_to_first_token=max(0.0, first - self.arrival),
            end_to_end=max(0.0, finished - self.arrival),
        )
