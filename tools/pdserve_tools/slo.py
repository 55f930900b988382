"""Latency objectives and the TPOT they are checked against: one definition for every benchmark and the simulator.

Definitions (vLLM's `bench serve`, `vllm/benchmarks/serve.py`):

- TTFT: first token's time - send (or arrival) time. E2E: last token's time - that same start.
- TPOT = (E2E - TTFT) / (output tokens - 1): the mean time per output token after the first. `tpot` returns None
  for a request of one output token (or none): it has no token after the first, so it enters no TPOT
  distribution.
- `Slo`: objectives in seconds, each optional (at least one set). `Slo.met` is vLLM's goodput test: every objective
  set is met (value <= objective), and a request without a TPOT counts as TPOT 0, so it meets any TPOT objective.
  Whether the request succeeded is the caller's to check first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

_MS = 1000.0


def tpot(ttft_s: float, e2e_s: float, tokens: int) -> float | None:
    """Time per output token after the first, from one request's TTFT and E2E latency (same clock, same start) and
    its output token count; None for fewer than two tokens."""
    return (e2e_s - ttft_s) / (tokens - 1) if tokens > 1 else None


@dataclass(frozen=True, slots=True)
class Slo:
    """Service-level objectives in seconds; None leaves a metric unconstrained (at least one must be set)."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def __post_init__(self) -> None:
        values = (self.ttft_s, self.tpot_s, self.e2e_s)
        if all(v is None for v in values):
            raise ValueError("an SLO needs at least one of ttft, tpot, e2e")
        if any(v is not None and not v >= 0 for v in values):
            raise ValueError("SLO values must be non-negative")

    @classmethod
    def parse(cls, pairs: Iterable[str]) -> Slo:
        """vLLM's `--goodput` syntax: "KEY:MS" pairs, KEY one of ttft, tpot, e2el, values in milliseconds."""
        names = {"ttft": "ttft_s", "tpot": "tpot_s", "e2el": "e2e_s"}
        found: dict[str, float] = {}
        for pair in pairs:
            key, sep, value = pair.partition(":")
            if not sep or key not in names:
                raise ValueError(f"bad SLO {pair!r}: write KEY:MILLISECONDS with KEY one of ttft, tpot, e2el")
            try:
                found[names[key]] = float(value) / _MS
            except ValueError:
                raise ValueError(f"bad SLO {pair!r}: {value!r} is not a number of milliseconds") from None
        return cls(**found)

    def met(self, ttft_s: float, tpot_s: float | None, e2e_s: float) -> bool:
        """Whether a served request with these latencies meets every objective set; `tpot_s` None (one output
        token) counts as 0."""
        return ((self.ttft_s is None or ttft_s <= self.ttft_s)
                and (self.tpot_s is None or (tpot_s or 0.0) <= self.tpot_s)
                and (self.e2e_s is None or e2e_s <= self.e2e_s))

    def to_json(self) -> dict[str, float | None]:
        """vLLM's `--goodput` keys, in milliseconds (None: not set)."""
        return {key: None if v is None else v * _MS
                for key, v in (("ttft_ms", self.ttft_s), ("tpot_ms", self.tpot_s), ("e2el_ms", self.e2e_s))}
