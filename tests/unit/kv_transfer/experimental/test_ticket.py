import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_transfer.experimental.ticket import (
    LIVE,
    TERMINAL,
    Abort,
    Consume,
    Endpoint,
    Epochs,
    Expire,
    IllegalTransition,
    LayerLanded,
    Renew,
    Side,
    StaleEpoch,
    StartStreaming,
    TicketState,
    TransferError,
    TransferTicket,
    sender_side,
    transition,
)

S = TicketState
P = Endpoint("p0", 1)
D = Endpoint("d0", 1)

# The legal edges, written out independently of the implementation: (from, event type) -> possible targets.
EDGES: dict[tuple[TicketState, type], set[TicketState]] = {
    (S.PENDING, StartStreaming): {S.STREAMING},
    (S.STREAMING, LayerLanded): {S.STREAMING, S.LANDED},
    (S.LANDED, Consume): {S.CONSUMED},
    (S.LANDED, Renew): {S.LANDED},
    **{(s, Abort): {S.ABORTED} for s in (S.PENDING, S.STREAMING, S.LANDED)},
    **{(s, Expire): {S.EXPIRED} for s in (S.PENDING, S.STREAMING, S.LANDED)},
}

ALL_EVENTS = [StartStreaming(), LayerLanded(0), Consume(), Renew(), Abort(Side.PREFILL, "x"), Expire()]


def make(num_layers: int = 3, deadline: float = 10.0, lease_s: float = 5.0) -> TransferTicket:
    return TransferTicket("r1", P, D, num_layers=num_layers, num_blocks=2, num_bytes=4096, deadline=deadline,
                          lease_s=lease_s)


def landed(at: float = 2.0, num_layers: int = 1) -> TransferTicket:
    t = transition(make(num_layers=num_layers), StartStreaming(), 1.0)
    for layer in range(num_layers):
        t = transition(t, LayerLanded(layer), at)
    return t


def in_state(state: TicketState) -> TransferTicket:
    """A ticket in `state`, reached through legal transitions only."""
    if state is S.PENDING:
        return make(num_layers=1)
    if state is S.STREAMING:
        return transition(make(num_layers=1), StartStreaming(), 1.0)
    if state is S.LANDED:
        return landed()
    event = {S.CONSUMED: Consume(), S.ABORTED: Abort(Side.DECODE, "gone"), S.EXPIRED: Expire()}[state]
    return transition(landed(), event, 2.0 if state is not S.EXPIRED else 100.0)


def test_happy_path_records_each_phase():
    t = make()
    assert (t.state, t.due_at, t.layers_landed, t.transfer_s) == (S.PENDING, 10.0, 0, None)
    t = transition(t, StartStreaming(), 1.0)
    assert (t.state, t.started_at) == (S.STREAMING, 1.0)
    t = transition(t, LayerLanded(2), 1.5)  # layers may land out of order
    t = transition(t, LayerLanded(0), 2.0)
    assert (t.state, t.layers_landed) == (S.STREAMING, 2)
    t = transition(t, LayerLanded(1), 3.0)
    assert (t.state, t.landed_at, t.lease_until, t.due_at) == (S.LANDED, 3.0, 8.0, 8.0)
    assert t.transfer_s == pytest.approx(2.0)
    t = transition(t, Consume(), 4.0)
    assert (t.state, t.ended_at, t.reason, t.due_at) == (S.CONSUMED, 4.0, "consumed", math.inf)


def test_transition_returns_a_new_ticket_and_leaves_the_old_one_alone():
    t = make()
    t2 = transition(t, StartStreaming(), 1.0)
    assert t.state is S.PENDING and t2.state is S.STREAMING
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.state = S.STREAMING  # type: ignore[misc]


@pytest.mark.parametrize("state", list(S))
@pytest.mark.parametrize("event", ALL_EVENTS, ids=lambda e: type(e).__name__)
def test_every_state_event_pair_is_legal_or_raises(state, event):
    ticket = in_state(state)
    now = ticket.due_at if isinstance(event, Expire) and state in LIVE else 2.5
    targets = EDGES.get((state, type(event)))
    if targets is None:
        with pytest.raises(IllegalTransition) as info:
            transition(ticket, event, now)
        err = info.value
        assert (err.request_id, err.from_state, err.event) == ("r1", state, event)
        assert f"illegal {state.name} -> {err.to_state.name} on {event}" in str(err)
    else:
        assert transition(ticket, event, now).state in targets


@pytest.mark.parametrize("state", sorted(TERMINAL, key=lambda s: s.value))
def test_terminal_states_absorb_everything(state):
    ticket = in_state(state)
    for event in [*ALL_EVENTS, Abort(Side.DECODE, "late")]:
        with pytest.raises(IllegalTransition, match="is legal only from"):
            transition(ticket, event, 1000.0)


def test_illegal_transition_names_from_to_and_event():
    expected = r"'r1': illegal STREAMING -> CONSUMED on Consume\(\): Consume is legal only from LANDED"
    with pytest.raises(IllegalTransition, match=expected):
        transition(in_state(S.STREAMING), Consume(), 2.0)


def test_a_layer_counted_twice_is_refused():
    t = transition(transition(make(), StartStreaming(), 1.0), LayerLanded(1), 1.0)
    with pytest.raises(IllegalTransition, match="layer 1 already landed"):
        transition(t, LayerLanded(1), 1.5)


def test_a_layer_beyond_the_model_is_refused():
    t = transition(make(num_layers=2), StartStreaming(), 1.0)
    with pytest.raises(IllegalTransition, match=r"layers 0\.\.1"):
        transition(t, LayerLanded(2), 1.5)
    with pytest.raises(ValueError, match="layer must be >= 0"):
        LayerLanded(-1)


def test_a_single_layer_model_lands_on_its_only_layer():
    assert landed(num_layers=1).state is S.LANDED


@pytest.mark.parametrize("side", list(Side))
@pytest.mark.parametrize("state", [S.PENDING, S.STREAMING, S.LANDED])
def test_either_side_can_abort_a_live_ticket(side, state):
    t = transition(in_state(state), Abort(side, "engine preempted"), 3.0)
    assert (t.state, t.ended_at) == (S.ABORTED, 3.0)
    assert t.reason == f"aborted by {side.value}: engine preempted"


def test_abort_is_legal_even_past_due():
    assert transition(make(), Abort(Side.PREFILL, "late"), 50.0).state is S.ABORTED


def test_expire_waits_for_the_deadline_and_counts_it_as_due():
    with pytest.raises(IllegalTransition, match="not due until 10.000, now is 9.999"):
        transition(make(), Expire(), 9.999)
    t = transition(make(), Expire(), 10.0)
    assert (t.state, t.reason) == (S.EXPIRED, "deadline passed with 0/3 layers landed")


@pytest.mark.parametrize(("event", "state"), [(StartStreaming(), S.PENDING), (LayerLanded(0), S.STREAMING)])
def test_progress_past_the_deadline_is_refused(event, state):
    with pytest.raises(IllegalTransition, match="the deadline passed at 10.000, now is 10.000"):
        transition(in_state(state), event, 10.0)


def test_landing_swaps_the_deadline_for_the_lease():
    t = landed(at=9.0)  # deadline 10, lease 5s: due at 14 now
    assert t.due_at == 14.0
    assert transition(t, Consume(), 12.0).state is S.CONSUMED  # past the deadline, within the lease
    with pytest.raises(IllegalTransition, match="not due until 14.000"):
        transition(t, Expire(), 12.0)
    with pytest.raises(IllegalTransition, match="the lease ran out at 14.000"):
        transition(t, Consume(), 14.0)
    expired = transition(t, Expire(), 14.0)
    assert expired.reason == "lease ran out: the decode did not consume the landed KV within 5s"


def test_renew_extends_the_lease_from_now():
    t = transition(landed(at=2.0), Renew(), 6.0)  # lease was until 7
    assert (t.state, t.lease_until) == (S.LANDED, 11.0)
    assert transition(t, Consume(), 10.0).state is S.CONSUMED
    with pytest.raises(IllegalTransition, match="the lease ran out"):
        transition(landed(at=2.0), Renew(), 7.0)  # too late to renew


def test_sender_side_progress_from_decode_abort_from_its_side_expiry_from_no_one():
    assert [sender_side(e) for e in (StartStreaming(), LayerLanded(0), Consume(), Renew())] == [Side.DECODE] * 4
    assert sender_side(Abort(Side.PREFILL, "x")) is Side.PREFILL
    assert sender_side(Abort(Side.DECODE, "x")) is Side.DECODE
    assert sender_side(Expire()) is None


def test_side_of_matches_instance_and_epoch():
    t = make()
    assert (t.side_of(P), t.side_of(D)) == (Side.PREFILL, Side.DECODE)
    assert t.side_of(Endpoint("p0", 2)) is None  # another incarnation of the same instance
    assert t.side_of(Endpoint("x", 1)) is None
    assert (t.endpoint(Side.PREFILL), t.endpoint(Side.DECODE)) == (P, D)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"request_id": ""}, "non-empty request_id"),
        ({"decode": Endpoint("p0", 3)}, "prefill and decode are both 'p0'"),
        ({"num_layers": 0}, "num_layers >= 1"),
        ({"num_blocks": 0}, "num_blocks >= 1"),
        ({"num_bytes": -1}, "num_bytes >= 0"),
        ({"deadline": math.nan}, "deadline must be a number"),
        ({"lease_s": 0.0}, "lease_s > 0"),
        ({"lease_s": math.nan}, "lease_s > 0"),
    ],
)
def test_ticket_validates_its_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(make(), **kwargs)


def test_endpoint_validates_and_prints_as_id_at_epoch():
    assert str(Endpoint("d3", 7)) == "d3@7"
    with pytest.raises(ValueError, match="non-empty instance_id"):
        Endpoint("", 0)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        Endpoint("d3", -1)


def test_epochs_fence_older_incarnations():
    epochs = Epochs()
    assert epochs.current("p0") is None
    assert epochs.admit(Endpoint("p0", 3)) is False  # first sighting supersedes nothing
    assert epochs.admit(Endpoint("p0", 3)) is False
    assert epochs.admit(Endpoint("p1", 0)) is False  # instances are fenced independently
    with pytest.raises(StaleEpoch, match="instance 'p0': epoch 2 is stale, current is 3") as info:
        epochs.admit(Endpoint("p0", 2))
    assert (info.value.sender, info.value.current) == (Endpoint("p0", 2), 3)
    assert epochs.admit(Endpoint("p0", 5)) is True  # a restart
    assert epochs.current("p0") == 5
    with pytest.raises(StaleEpoch):
        epochs.admit(Endpoint("p0", 3))


def test_protocol_errors_share_a_root():
    assert issubclass(IllegalTransition, TransferError) and issubclass(StaleEpoch, TransferError)


events = st.one_of(
    st.just(StartStreaming()),
    st.builds(LayerLanded, st.integers(0, 3)),
    st.just(Consume()),
    st.just(Renew()),
    st.builds(Abort, st.sampled_from(Side), st.just("test")),
    st.just(Expire()),
)


@settings(max_examples=300, database=None, deadline=None)
@given(
    num_layers=st.integers(1, 3),
    steps=st.lists(st.tuples(events, st.sampled_from([0.0, 0.5, 1.0, 4.0])), max_size=25),
)
def test_random_event_sequences_only_follow_legal_edges(num_layers, steps):
    ticket, now = make(num_layers=num_layers, deadline=6.0, lease_s=3.0), 0.0
    for event, dt in steps:
        now += dt
        try:
            after = transition(ticket, event, now)
        except IllegalTransition as err:
            assert err.from_state is ticket.state
            continue
        assert after.state in EDGES[(ticket.state, type(event))]
        if after.state in (S.LANDED, S.CONSUMED):
            assert after.landed_mask == 2**num_layers - 1
        elif after.state in (S.PENDING, S.STREAMING):
            assert after.landed_mask != 2**num_layers - 1
        assert after.landed_mask & ticket.landed_mask == ticket.landed_mask  # landed layers never un-land
        if after.is_terminal:
            assert after.ended_at == now and after.reason
        ticket = after
