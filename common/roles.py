"""`Role`: what an instance does for the router. A string enum: it compares equal to its value, which is how
roles appear in metrics labels, config and the wire."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    PREFILL = "prefill"  # computes prompts and hands their KV on (vLLM kv_producer)
    DECODE = "decode"  # continues requests from received KV (vLLM kv_consumer)
    COLOCATED = "colocated"  # runs whole requests (no KV role)
