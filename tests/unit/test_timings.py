import pytest

from pdserve.router.timings import Clock


def test_colocated_phases_add_up():
    clock = Clock(arrival=10.0, dispatched=10.5, prefill_compute=0.25)
    clock.tokens_arrived(11.0, 1)
    clock.tokens_arrived(11.1, 1)
    clock.tokens_arrived(11.2, 0)  # an empty step changes nothing
    clock.tokens_arrived(11.5, 2)
    t = clock.colocated(finished=11.6)
    assert t.router_queue == pytest.approx(0.5)
    assert t.prefill_compute == pytest.approx(0.25)
    assert t.prefill_queue == pytest.approx(0.25)
    assert t.first_decode_step == pytest.approx(0.1)
    assert t.decode == pytest.approx(0.4)
    assert t.time_to_first_token == pytest.approx(1.0)
    assert t.end_to_end == pytest.approx(1.6)
    assert t.kv_transfer == 0.0 and t.decode_queue == 0.0
    assert t.router_queue + t.prefill_queue + t.prefill_compute == pytest.approx(t.time_to_first_token)


def test_a_single_token_request_has_no_decode_phase():
    clock = Clock(arrival=0.0, dispatched=0.0, prefill_compute=0.3)
    clock.tokens_arrived(0.2, 1)
    t = clock.colocated(finished=0.2)
    # The engine's compute cannot exceed what the router observed.
    assert t.prefill_compute == pytest.approx(0.2)
    assert t.prefill_queue == 0.0
    assert t.first_decode_step == 0.0 and t.decode == 0.0


def test_first_chunk_with_several_tokens_starts_decode_at_once():
    clock = Clock(arrival=0.0, dispatched=0.0)
    clock.tokens_arrived(1.0, 3)
    clock.tokens_arrived(2.0, 1)
    t = clock.colocated(finished=2.0)
    assert t.first_decode_step == 0.0
    assert t.decode == pytest.approx(1.0)
