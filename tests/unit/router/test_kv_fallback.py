"""The decode leg's KV params after the prefill: the RecvSpec when the KV is coming, none when the prefill reported
that it will not (the decode instance prefills at once), and the failure counted by reason."""

from __future__ import annotations

import pytest

from common.results import KVLinkFailure, PrefillResult
from kv_transfer.params import RecvSpec, to_params
from router.kv_fallback import REASONS, decode_kv_params, failure_reason
from router.metrics import RouterMetrics

RECV = to_params(RecvSpec("leg-1", "prefill-0", 129, 1e12))
FAILURE = KVLinkFailure("prefill-0", "10.213.0.1", "decode-0", "node:b,tcp:10.214.0.2:41234", "unreachable",
                        "PeerGone: could not connect to ('10.214.0.2', 41234): [Errno 113] No route to host")


def prefill(failure: KVLinkFailure | None = None) -> PrefillResult:
    result = PrefillResult([42], None, 0.01, 0.2)
    if failure is None:
        return result
    return PrefillResult([42], None, 0.01, 0.2, kv_failure=str(failure), kv_failure_reason=failure.reason)


def test_kv_on_its_way_is_received():
    assert decode_kv_params(prefill(), RECV) is RECV
    assert failure_reason(prefill()) is None


def test_kv_that_will_not_come_is_not_waited_for_and_is_counted_by_reason():
    first = prefill(FAILURE)
    assert decode_kv_params(first, RECV) is None
    assert failure_reason(first) == "unreachable"
    metrics = RouterMetrics()
    metrics.kv_transfer_failed("unreachable")
    assert metrics.registry.get_sample_value("pdserve_kv_transfer_failures_total", {"reason": "unreachable"}) == 1


def test_the_failure_names_both_ends():
    text = prefill(FAILURE).kv_failure
    assert text is not None
    for part in ("unreachable", "prefill-0", "10.213.0.1", "decode-0", "10.214.0.2:41234", "No route to host"):
        assert part in text


@pytest.mark.parametrize("reason", sorted(REASONS))
def test_every_reason_a_prefill_gives_is_its_own_label(reason):
    first = PrefillResult([1], None, 0.0, 0.0, kv_failure="...", kv_failure_reason=reason)
    assert failure_reason(first) == reason


def test_an_unknown_reason_is_counted_as_error_so_the_label_stays_bounded():
    first = PrefillResult([1], None, 0.0, 0.0, kv_failure="something new", kv_failure_reason="a-new-kind")
    assert failure_reason(first) == "error"
    assert decode_kv_params(first, RECV) is None


def test_a_prefill_result_from_the_wire_without_the_new_fields_reads_as_kv_coming():
    first = PrefillResult(**{"token_ids": [1], "finish_reason": None, "engine_queue": 0.0, "compute": 0.0})
    assert decode_kv_params(first, RECV) is RECV
