"""Service-level objectives per request, and shedding: refusing a request that is projected to miss its TTFT
objective before it runs (`router.slo`, `router.shed`). Pure code.

A leg's first token comes after the time its request has already spent at the router (admission, the wait for
KV room), then the prompt tokens queued ahead of it on the instance that computes its prompt, then its own, at the
prefill pace (`split.PrefillPace`: seconds per prompt token, learned from the prefills the router saw finish):

    projected TTFT = waited + pace * (queued + tokens)

`tokens` are the prompt tokens that instance computes: those its prefix cache holds (as far as the router tracks
them) cost nothing. For a disaggregated leg the instance is the prefill instance with the least `queued + tokens`,
so a request is refused only when no prefill instance could give it its first token in time. Without a pace
measured yet, nothing is refused.

A refused request's retry hint is the projected excess, `projected - ttft_s`: the time the queue ahead of it
needs to drain by that much at the same pace (at least `floor_s`, the router's `retry_after_s`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Objectives:
    """Every request's objectives (None: unchecked) and whether one projected to miss `ttft_s` is refused."""

    ttft_s: float | None = None  # time to first token
    tpot_s: float | None = None  # time per output token after the first
    shed: bool = False
    retry_floor_s: float = 1.0  # the least retry hint of a refused request

    def __post_init__(self) -> None:
        if self.shed and self.ttft_s is None:
            raise ValueError("shedding needs a TTFT objective")


def projected_ttft(waited_s: float, queued: int, tokens: int, pace_s: float) -> float:
    """Seconds from the request's arrival to its first token (see the module docstring)."""
    return waited_s + pace_s * (queued + tokens)


def shed_after(waited_s: float, queued: int, tokens: int, pace_s: float | None, ttft_s: float,
               floor_s: float) -> float | None:
    """None: the leg is projected to meet `ttft_s` (or no pace is known yet); else the retry hint in seconds of
    a request refused for missing it."""
    if pace_s is None:
        return None
    excess = projected_ttft(waited_s, queued, tokens, pace_s) - ttft_s
    return None if excess <= 0 else max(excess, floor_s)
