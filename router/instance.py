"""The `Instance` noun as policies see it: `InstanceSnapshot`, one worker's load at a moment. Plain data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InstanceSnapshot:
    instance_id: str
    role: str  # "colocated", "prefill" or "decode"
    outstanding: int  # requests placed on it and not yet finished
    healthy: bool = True
