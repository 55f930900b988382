from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from kv_transfer.experimental.ledger import (
    BlockInUse,
    BlockLedger,
    DoubleFree,
    DuplicateTicket,
    LedgerError,
    TicketTable,
    UnknownTicket,
    WrongSender,
)
from kv_transfer.experimental.ticket import (
    Abort,
    Consume,
    Endpoint,
    Event,
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
)

S = TicketState
P = Endpoint("p0", 1)
D = Endpoint("d0", 1)


def ticket(rid: str = "r1", prefill: Endpoint = P, decode: Endpoint = D, deadline: float = 10.0) -> TransferTicket:
    return TransferTicket(rid, prefill, decode, num_layers=2, num_blocks=2, num_bytes=1 << 20, deadline=deadline,
                          lease_s=5.0)


def opened(*tickets: TransferTicket) -> TicketTable:
    table = TicketTable()
    for n, t in enumerate(tickets):
        table.open(t, [10 * n, 10 * n + 1], [100 + 10 * n, 100 + 10 * n + 1], now=0.0)
    return table


def land(table: TicketTable, rid: str = "r1", now: float = 1.0) -> TransferTicket:
    decode = table.get(rid).decode
    table.apply(rid, decode, StartStreaming(), now)
    for layer in range(table.get(rid).num_layers):
        table.apply(rid, decode, LayerLanded(layer), now)
    return table.get(rid)


def empty(table: TicketTable) -> bool:
    return table.outstanding(Side.PREFILL) == {} and table.outstanding(Side.DECODE) == {}


# BlockLedger


def test_ledger_allocates_and_releases_per_request():
    ledger = BlockLedger("prefill")
    ledger.allocate("a", [3, 1])
    ledger.allocate("b", [2])
    ledger.allocate("a", [7])
    assert ledger.outstanding() == {"a": (3, 1, 7), "b": (2,)}
    assert ledger.release("a") == (3, 1, 7)
    assert ledger.outstanding() == {"b": (2,)} and ledger.held("a") == ()
    ledger.allocate("c", [3])  # a freed block can be handed out again
    assert ledger.held("c") == (3,)


def test_ledger_releasing_twice_is_a_double_free():
    ledger = BlockLedger("decode")
    ledger.allocate("a", [1])
    ledger.release("a")
    with pytest.raises(DoubleFree, match="decode: request 'a' holds no blocks"):
        ledger.release("a")
    with pytest.raises(DoubleFree):
        ledger.release("never")


def test_ledger_free_some_blocks():
    ledger = BlockLedger("prefill")
    ledger.allocate("a", [1, 2, 3])
    ledger.free("a", [2])
    assert ledger.held("a") == (1, 3)
    ledger.free("a", [1, 3])
    assert ledger.outstanding() == {}


@pytest.mark.parametrize("blocks", [[2, 9], [9], [1, 1]], ids=["unknown", "other-request", "twice-in-one-call"])
def test_ledger_free_of_a_block_not_held_frees_nothing(blocks):
    ledger = BlockLedger("prefill")
    ledger.allocate("a", [1, 2])
    ledger.allocate("b", [9])
    with pytest.raises(DoubleFree, match="prefill: request 'a' frees blocks it does not hold"):
        ledger.free("a", blocks)
    assert ledger.outstanding() == {"a": (1, 2), "b": (9,)}


def test_ledger_free_twice_is_a_double_free():
    ledger = BlockLedger("prefill")
    ledger.allocate("a", [1, 2])
    ledger.free("a", [1])
    with pytest.raises(DoubleFree):
        ledger.free("a", [1])


def test_ledger_allocating_a_held_block_allocates_nothing():
    ledger = BlockLedger("decode")
    ledger.allocate("a", [1])
    with pytest.raises(BlockInUse, match="decode: block 1 for request 'b' is held by 'a'"):
        ledger.allocate("b", [5, 1])
    with pytest.raises(BlockInUse, match="lists a block twice"):
        ledger.allocate("b", [5, 5])
    with pytest.raises(ValueError, match="allocates no blocks"):
        ledger.allocate("b", [])
    assert ledger.outstanding() == {"a": (1,)}


def test_ledger_errors_are_bugs_not_protocol_refusals():
    assert issubclass(DoubleFree, LedgerError) and issubclass(BlockInUse, LedgerError)
    assert not issubclass(DoubleFree, TransferError)
    for error in (UnknownTicket, DuplicateTicket, WrongSender):
        assert issubclass(error, TransferError)


# TicketTable


def test_consume_releases_both_sides_once():
    table = opened(ticket())
    assert table.outstanding(Side.PREFILL) == {"r1": (0, 1)}
    assert table.outstanding(Side.DECODE) == {"r1": (100, 101)}
    assert land(table).state is S.LANDED
    # The prefill keeps its copy of landed KV until the decode consumes it.
    assert table.outstanding(Side.PREFILL) == {"r1": (0, 1)} and table.drain() == []
    assert table.apply("r1", D, Consume(), 2.0).state is S.CONSUMED
    [release] = table.drain()
    assert (release.ticket.state, release.prefill_blocks, release.decode_blocks) == (S.CONSUMED, (0, 1), (100, 101))
    assert empty(table) and table.drain() == []


@pytest.mark.parametrize("late", [Abort(Side.PREFILL, "late"), Abort(Side.DECODE, "late")])
def test_an_abort_after_consume_releases_nothing(late):
    table = opened(ticket())
    land(table)
    table.apply("r1", D, Consume(), 2.0)
    table.drain()
    sender = P if late.side is Side.PREFILL else D
    assert table.apply("r1", sender, late, 3.0).state is S.CONSUMED
    assert table.drain() == []


def test_aborts_from_both_sides_release_once():
    table = opened(ticket())
    table.apply("r1", D, StartStreaming(), 1.0)
    assert table.apply("r1", P, Abort(Side.PREFILL, "preempted"), 1.5).reason == "aborted by prefill: preempted"
    assert table.apply("r1", D, Abort(Side.DECODE, "client gone"), 1.6).reason == "aborted by prefill: preempted"
    assert [r.ticket.state for r in table.drain()] == [S.ABORTED]
    assert empty(table)


def test_other_events_on_an_ended_ticket_are_refused():
    table = opened(ticket())
    table.apply("r1", P, Abort(Side.PREFILL, "x"), 1.0)
    with pytest.raises(IllegalTransition, match="illegal ABORTED -> STREAMING"):
        table.apply("r1", D, StartStreaming(), 1.0)
    assert len(table.drain()) == 1


def test_sweep_expires_what_is_due_and_only_that():
    table = opened(ticket("late"), ticket("landed"), ticket("fresh", deadline=20.0))
    land(table, "landed", now=8.0)  # lease until 13
    assert table.sweep(9.9) == []
    assert [(t.request_id, t.state) for t in table.sweep(10.0)] == [("late", S.EXPIRED)]
    assert table.sweep(12.0) == []  # "landed" is past its deadline but within its lease
    assert [t.request_id for t in table.sweep(13.0)] == ["landed"]
    assert [t.request_id for t in table.sweep(20.0)] == ["fresh"]
    reasons = {r.ticket.request_id: r.ticket.reason for r in table.drain()}
    assert reasons == {
        "late": "deadline passed with 0/2 layers landed",
        "fresh": "deadline passed with 0/2 layers landed",
        "landed": "lease ran out: the decode did not consume the landed KV within 5s",
    }
    assert empty(table)


def test_a_late_consume_is_refused_even_before_any_sweep():
    table = opened(ticket())
    land(table, now=2.0)  # lease until 7
    with pytest.raises(IllegalTransition, match="illegal EXPIRED -> CONSUMED"):
        table.apply("r1", D, Consume(), 7.5)
    [release] = table.drain()
    assert release.ticket.state is S.EXPIRED and empty(table)


def test_a_late_abort_finds_the_ticket_expired():
    table = opened(ticket())
    assert table.apply("r1", P, Abort(Side.PREFILL, "x"), 11.0).state is S.EXPIRED
    assert len(table.drain()) == 1


def test_a_stale_epoch_message_is_refused_and_changes_nothing():
    table = opened(ticket(prefill=Endpoint("p0", 4)))
    before = table.get("r1")
    with pytest.raises(StaleEpoch, match="epoch 3 is stale, current is 4"):
        table.apply("r1", Endpoint("p0", 3), Abort(Side.PREFILL, "ghost"), 1.0)
    assert table.get("r1") == before and table.drain() == []


@pytest.mark.parametrize("side", list(Side))
def test_a_restart_aborts_the_older_incarnations_tickets(side):
    table = opened(ticket("a"), ticket("b", Endpoint("p1", 1), Endpoint("d1", 1)))
    restarted = Endpoint("p0" if side is Side.PREFILL else "d0", 2)
    [ended] = table.fence(restarted, now=3.0)
    assert (ended.request_id, ended.state, ended.ended_at) == ("a", S.ABORTED, 3.0)
    assert ended.reason == f"aborted by {side.value}: {side.value} instance restarted: epoch 1 superseded by 2"
    assert table.get("b").state is S.PENDING
    assert [r.ticket.request_id for r in table.drain()] == ["a"]
    assert table.fence(restarted, now=4.0) == []  # the same incarnation again: nothing more to end
    with pytest.raises(StaleEpoch):
        table.fence(Endpoint(restarted.instance_id, 1), now=4.0)


def test_a_restart_past_due_expires_rather_than_aborts():
    table = opened(ticket())
    assert [t.state for t in table.fence(Endpoint("d0", 2), now=11.0)] == [S.EXPIRED]


def test_a_message_from_a_newer_incarnation_fences_the_old_one():
    table = opened(ticket())
    with pytest.raises(WrongSender, match=r"'r1': message from d0@2 refused: not a party to the transfer p0@1 -> d0@1"):
        table.apply("r1", Endpoint("d0", 2), StartStreaming(), 1.0)
    assert table.get("r1").state is S.ABORTED and table.current_epoch("d0") == 2
    assert len(table.drain()) == 1


def test_open_with_a_newer_incarnation_fences_the_old_one():
    table = opened(ticket("a"))
    table.open(ticket("b", decode=Endpoint("d0", 2)), [5, 6], [105, 106], now=1.0)
    assert (table.get("a").state, table.get("b").state) == (S.ABORTED, S.PENDING)
    assert table.outstanding(Side.PREFILL) == {"b": (5, 6)}


def test_open_refuses_a_stale_incarnation_and_allocates_nothing():
    table = opened(ticket("a", prefill=Endpoint("p0", 2)))
    with pytest.raises(StaleEpoch):
        table.open(ticket("b", prefill=Endpoint("p0", 1)), [5, 6], [105, 106], now=1.0)
    assert list(table.outstanding(Side.PREFILL)) == ["a"] and list(table.outstanding(Side.DECODE)) == ["a"]


def test_open_refuses_a_held_block_without_leaking_the_other_side():
    table = opened(ticket("a"))  # holds prefill 0,1 and decode 100,101
    with pytest.raises(BlockInUse):
        table.open(ticket("b"), [5, 6], [101, 102], now=1.0)
    assert table.outstanding(Side.PREFILL) == {"a": (0, 1)}
    with pytest.raises(UnknownTicket):
        table.get("b")


def test_open_validates_its_input():
    table = opened(ticket())
    with pytest.raises(DuplicateTicket, match="'r1' already has a transfer ticket"):
        table.open(ticket(), [5, 6], [7, 8], now=0.0)
    with pytest.raises(ValueError, match="expected 2 blocks per side, got 1 prefill and 2 decode"):
        table.open(ticket("r2"), [5], [7, 8], now=0.0)
    started = land(opened(ticket("r3")), "r3")
    with pytest.raises(ValueError, match="open a PENDING ticket, not LANDED"):
        table.open(started, [5, 6], [7, 8], now=0.0)


@pytest.mark.parametrize(
    ("sender", "event", "match"),
    [
        (Endpoint("p9", 1), Abort(Side.PREFILL, "x"), "not a party"),
        (P, Consume(), r"Consume\(\) may come from the decode side only"),
        (D, Abort(Side.PREFILL, "x"), "may come from the prefill side only"),
        (D, Expire(), "may come from no worker: expiry is the clock's"),
    ],
)
def test_wrong_senders_are_refused(sender, event, match):
    table = opened(ticket())
    with pytest.raises(WrongSender, match=match):
        table.apply("r1", sender, event, 1.0)
    assert table.get("r1").state is S.PENDING


def test_forget_only_ended_tickets():
    table = opened(ticket())
    with pytest.raises(ValueError, match="cannot forget a live ticket"):
        table.forget("r1")
    table.apply("r1", D, Abort(Side.DECODE, "x"), 1.0)
    table.forget("r1")
    assert table.tickets() == []
    with pytest.raises(UnknownTicket, match="no transfer ticket for request 'r1'"):
        table.apply("r1", D, Abort(Side.DECODE, "x"), 1.0)


# Property: whatever happens, every block is released exactly once.

INSTANCES = {Side.PREFILL: ["p0", "p1"], Side.DECODE: ["d0", "d1"]}
events = st.one_of(
    st.just(StartStreaming()),
    st.builds(LayerLanded, st.integers(0, 2)),
    st.just(Consume()),
    st.just(Renew()),
    st.builds(Abort, st.sampled_from(Side), st.just("test")),
    st.just(Expire()),
)
block_sets = st.sets(st.integers(0, 11), min_size=1, max_size=3)


class TableMachine(RuleBasedStateMachine):
    """Drives a `TicketTable` with opens, messages (right, wrong, stale, duplicate), restarts, time and sweeps."""

    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        self.table = TicketTable()
        self.now = 0.0
        self.epoch = {i: 0 for ids in INSTANCES.values() for i in ids}
        self.allocated: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.released: Counter[str] = Counter()
        self.count = 0

    def held(self, side: int) -> set[int]:
        live = [t.request_id for t in self.table.tickets() if not t.is_terminal]
        return {b for rid in live for b in self.allocated[rid][side]}

    @rule(target=requests, p=st.sampled_from(INSTANCES[Side.PREFILL]), d=st.sampled_from(INSTANCES[Side.DECODE]),
          shift=st.sampled_from([0, 0, 0, -1, 1]), layers=st.integers(1, 3), pb=block_sets, db=block_sets,
          ttl=st.sampled_from([1.0, 5.0, 30.0]))
    def open(self, p, d, shift, layers, pb, db, ttl):
        rid, self.count = f"r{self.count}", self.count + 1
        n = min(len(pb), len(db))
        blocks = (tuple(sorted(pb))[:n], tuple(sorted(db))[:n])
        prefill = Endpoint(p, max(0, self.epoch[p] + shift))
        stale, newer = prefill.epoch < self.epoch[p], prefill.epoch > self.epoch[p]
        t = TransferTicket(rid, prefill, Endpoint(d, self.epoch[d]), num_layers=layers, num_blocks=n,
                           num_bytes=n * 4096, deadline=self.now + ttl, lease_s=2.0)
        in_use = bool(set(blocks[0]) & self.held(0) or set(blocks[1]) & self.held(1))
        try:
            self.table.open(t, *blocks, now=self.now)
        except StaleEpoch:
            assert stale
        except BlockInUse:
            assert in_use and not stale
        else:
            # A newer incarnation fences the old one first, which may free the blocks this open asks for.
            assert not stale and (not in_use or newer)
            self.allocated[rid] = blocks
        if not stale:
            self.epoch[p] = prefill.epoch
        return rid

    def send(self, rid: str, sender: Endpoint, event: Event) -> None:
        known = rid in {t.request_id for t in self.table.tickets()}
        before = self.table.get(rid) if known else None
        stale, newer = sender.epoch < self.epoch[sender.instance_id], sender.epoch > self.epoch[sender.instance_id]
        try:
            after = self.table.apply(rid, sender, event, self.now)
        except TransferError as err:
            assert isinstance(err, StaleEpoch) == stale
            if not stale:
                assert isinstance(err, UnknownTicket) == (not known)
            if before is not None and not newer and self.now < before.due_at:
                assert self.table.get(rid) == before  # a refused message changes nothing
            if not stale and before is not None and before.is_terminal and isinstance(event, Abort):
                # A stale incarnation may carry the ticket's own endpoint; fencing refuses it first.
                assert sender != before.endpoint(event.side), "a party's abort of an ended ticket is a no-op"
        else:
            assert before is not None and not stale
            assert after.state is before.state or after.is_terminal or (
                (before.state, after.state) in {(S.PENDING, S.STREAMING), (S.STREAMING, S.LANDED)})
        if not stale:
            self.epoch[sender.instance_id] = sender.epoch

    @rule(rid=requests, who=st.sampled_from(["prefill", "decode", "decode", "stranger"]),
          shift=st.sampled_from([0, 0, 0, -1, 1]), event=events)
    def any_message(self, rid, who, shift, event):
        ref = self.table.get(rid).decode if rid in self.allocated else Endpoint("d0", self.epoch["d0"])
        if who == "prefill" and rid in self.allocated:
            ref = self.table.get(rid).prefill
        instance = "p9" if who == "stranger" else ref.instance_id
        self.epoch.setdefault(instance, 0)
        self.send(rid, Endpoint(instance, max(0, self.epoch[instance] + shift)), event)

    @rule(rid=requests, renew=st.booleans(), steps=st.integers(1, 5))
    def progress(self, rid, renew, steps):
        """What a healthy decode would send next, so that runs reach LANDED and CONSUMED often."""
        for _ in range(steps):
            if rid not in self.allocated:
                return
            t = self.table.get(rid)
            missing = [i for i in range(t.num_layers) if not t.landed_mask >> i & 1]
            event: Event = {
                S.PENDING: StartStreaming(),
                S.STREAMING: LayerLanded(missing[0]) if missing else Consume(),
                S.LANDED: Renew() if renew else Consume(),
            }.get(t.state, Abort(Side.DECODE, "duplicate"))
            self.send(rid, Endpoint(t.decode.instance_id, self.epoch[t.decode.instance_id]), event)

    @rule(side=st.sampled_from(Side), index=st.integers(0, 1))
    def restart(self, side, index):
        instance = INSTANCES[side][index]
        self.epoch[instance] += 1
        ended = self.table.fence(Endpoint(instance, self.epoch[instance]), self.now)
        assert all(t.is_terminal for t in ended)
        for t in self.table.tickets():
            if t.endpoint(side).instance_id == instance and t.endpoint(side).epoch < self.epoch[instance]:
                assert t.is_terminal

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.5]))
    def tick(self, dt):
        self.now += dt

    @rule()
    def sweep(self):
        assert all(t.state is S.EXPIRED for t in self.table.sweep(self.now))
        assert all(t.is_terminal or self.now < t.due_at for t in self.table.tickets())

    @rule(rid=requests)
    def forget(self, rid):
        if rid in self.allocated and self.table.get(rid).is_terminal:
            self.table.forget(rid)
            del self.allocated[rid]  # its one release has been counted already

    @invariant()
    def blocks_are_accounted(self):
        for release in self.table.drain():
            rid = release.ticket.request_id
            assert release.ticket.is_terminal and self.released[rid] == 0
            self.released[rid] += 1
            assert (release.prefill_blocks, release.decode_blocks) == self.allocated[rid]
        live = [t.request_id for t in self.table.tickets() if not t.is_terminal]
        assert self.table.outstanding(Side.PREFILL) == {rid: self.allocated[rid][0] for rid in live}
        assert self.table.outstanding(Side.DECODE) == {rid: self.allocated[rid][1] for rid in live}
        for t in self.table.tickets():
            assert self.released[t.request_id] == (1 if t.is_terminal else 0)

    def teardown(self):
        self.table.sweep(self.now + 1000.0)  # let every deadline and lease pass
        self.blocks_are_accounted()
        assert all(t.is_terminal for t in self.table.tickets())
        assert empty(self.table)
        assert all(self.released[rid] == 1 for rid in self.allocated)


TableMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, database=None, deadline=None)
TestTicketTableFreesEveryBlockExactlyOnce = TableMachine.TestCase
