import pytest

from router.timings import Clock


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


def test_disaggregated_phases_add_up_to_the_end_to_end_latency():
    c = Clock(arrival=10.0)
    c.dispatched = 10.5  # held 0.5 s for a decode instance's receive buffer
    c.prefill_queue, c.prefill_compute = 0.1, 0.3
    c.tokens_arrived(11.0, 1)  # the prefill's first token
    c.decode_dispatched = 11.01
    c.kv_wait, c.decode_compute = 0.04, 0.02
    c.tokens_arrived(11.1, 1)
    c.tokens_arrived(11.5, 3)
    t = c.disaggregated(11.6)
    assert t.router_queue == pytest.approx(0.5)
    assert t.prefill_compute == pytest.approx(0.3) and t.prefill_queue == pytest.approx(0.2)
    assert t.kv_transfer == pytest.approx(0.04) and t.first_decode_step == pytest.approx(0.02)
    assert t.decode_queue == pytest.approx(0.01 + 0.03)
    assert t.decode == pytest.approx(0.4)
    assert t.time_to_first_token == pytest.approx(1.0) and t.end_to_end == pytest.approx(1.6)
    phases = (t.router_queue + t.prefill_queue + t.prefill_compute + t.kv_transfer + t.decode_queue
              + t.first_decode_step + t.decode)
    assert phases == pytest.approx(t.end_to_end - (11.6 - 11.5))


def test_engine_durations_never_exceed_what_the_router_saw():
    c = Clock(arrival=0.0)
    c.dispatched = 0.0
    c.prefill_compute = 5.0  # a clock glitch: longer than the whole wait for the first token
    c.tokens_arrived(1.0, 1)
    c.decode_dispatched = 1.0
    c.kv_wait, c.decode_compute = 3.0, 3.0
    c.tokens_arrived(1.5, 1)
    t = c.disaggregated(1.5)
    assert t.prefill_compute == 1.0 and t.prefill_queue == 0.0
    assert t.kv_transfer == 0.5 and t.first_decode_step == 0.0 and t.decode_queue == 0.0
