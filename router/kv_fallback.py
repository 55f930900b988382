"""The decode leg's KV params, given the prefill's answer: the fallback when the KV will not come. Pure logic.

A prefill reports in its `PrefillResult` whether the link to the decode instance came up. When it did not
(`kv_failure`: refused, unreachable, timed out, ...), no byte of the prompt's KV will land, so the decode request
goes without its `RecvSpec`: the decode engine prefills the prompt (plus the first token) itself at once, rather
than wait for KV until the transfer's deadline and recompute then. Greedy output is the same token for token.

    recv = decode_kv_params(first, to_params(RecvSpec(...)))   # None: the decode instance prefills
    if recv is None:
        metrics.kv_transfer_failed(failure_reason(first))
"""

from __future__ import annotations

from typing import Any

from common.results import PrefillResult

# The reasons a prefill gives (`kv_transfer.dial`); any other is counted as "error", so the label stays bounded.
REASONS = frozenset({"refused", "unreachable", "timeout", "auth", "no_route", "error"})


def decode_kv_params(prefill: PrefillResult, recv_params: dict[str, Any]) -> dict[str, Any] | None:
    """`recv_params` when the prompt's KV is on its way; None when the prefill reported it will not come."""
    return None if prefill.kv_failure else recv_params


def failure_reason(prefill: PrefillResult) -> str | None:
    """The `pdserve_kv_transfer_failures_total` label for a prefill whose KV will not come; None when it will."""
    if not prefill.kv_failure:
        return None
    return prefill.kv_failure_reason if prefill.kv_failure_reason in REASONS else "error"
