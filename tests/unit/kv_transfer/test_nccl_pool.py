"""The NCCL transport's pure core: the communicator pool (budget, LRU, abort and rebuild) and the matching rules."""

from __future__ import annotations

import pytest

from kv_transfer.cupy_comm import device_spans, id_from_bytes, id_to_bytes
from kv_transfer.endpoint import Endpoint
from kv_transfer.nccl import SameDevice
from kv_transfer.nccl_keys import (
    Expect,
    Go,
    Offer,
    OutOfOrder,
    Reject,
    RejectCode,
    SendOrder,
    TransferKey,
    choose_path,
    match,
    refine,
    split,
)
from kv_transfer.nccl_pool import CommPool, CommState, Create, Evict, PoolConfig, Refuse, Reuse
from kv_transfer.transport import TransportError

MB = 1 << 20
A, B, C, D = (Endpoint(name, 0) for name in "abcd")


def pool(fits: int) -> CommPool:
    return CommPool(PoolConfig(budget_bytes=fits * 100 * MB, comm_bytes=100 * MB))


def built(p: CommPool, peer: Endpoint, now: float, deadline: float = 100.0) -> Create:
    """Acquire a new pair, report it built and release the lease: an idle READY pair last used at `now`."""
    decision = p.acquire(peer, deadline, now)
    assert isinstance(decision, Create)
    assert p.created(peer.instance_id, decision.lease.generation, decision.lease.generation)
    assert p.release(decision.lease, now)
    return decision


def states(p: CommPool) -> dict[str, tuple[int, CommState, int]]:
    return {v.peer.instance_id: (v.generation, v.state, v.leases) for v in p.pairs()}


# The pool: creation, reuse, budget.


def test_first_use_creates_then_reuses_the_same_generation() -> None:
    p = pool(2)
    first = p.acquire(A, 10.0, 0.0)
    assert isinstance(first, Create) and first.evict == () and first.lease.generation == 1
    second = p.acquire(A, 10.0, 1.0)  # still being built: the second transfer waits on the same one
    assert isinstance(second, Reuse) and second.lease.generation == 1
    assert second.lease.lease_id != first.lease.lease_id
    assert p.created("a", 1, 1)
    assert states(p) == {"a": (1, CommState.READY, 2)}
    assert p.used_bytes == 100 * MB


def test_lazy_one_communicator_per_peer_none_made_up_front() -> None:
    p = pool(4)
    assert p.pairs() == [] and p.used_bytes == 0
    built(p, A, 0.0)
    built(p, B, 1.0)
    assert p.used_bytes == 200 * MB
    assert [v.peer for v in p.pairs()] == [A, B]


def test_budget_evicts_the_least_recently_used_idle_pair() -> None:
    p = pool(2)
    built(p, A, 0.0)
    built(p, B, 1.0)
    assert isinstance(p.acquire(A, 100.0, 2.0), Reuse)  # A used again: B is now the least recent
    decision = p.acquire(C, 100.0, 3.0)
    assert isinstance(decision, Create)
    assert decision.evict == (Evict(B, 1, abort=False),)
    assert set(states(p)) == {"a", "c"}
    assert p.used_bytes == 200 * MB


def test_each_new_pair_over_budget_evicts_the_oldest_idle_one() -> None:
    p = pool(3)
    for t, peer in enumerate((A, B, C)):
        built(p, peer, float(t))
    decision = p.acquire(D, 100.0, 9.0)
    assert isinstance(decision, Create) and decision.evict == (Evict(A, 1, abort=False),)
    assert set(states(p)) == {"b", "c", "d"} and p.used_bytes == 300 * MB


def test_eviction_ties_break_by_peer_id() -> None:
    p = pool(2)
    built(p, B, 5.0)
    built(p, A, 5.0)
    decision = p.acquire(C, 100.0, 6.0)
    assert isinstance(decision, Create) and decision.evict == (Evict(A, 1, abort=False),)


def test_busy_pairs_are_never_evicted() -> None:
    p = pool(2)
    busy = p.acquire(A, 100.0, 0.0)  # oldest, but a transfer is in flight
    assert isinstance(busy, Create) and p.created("a", 1, 1)
    built(p, B, 1.0)
    decision = p.acquire(C, 100.0, 2.0)
    assert isinstance(decision, Create) and decision.evict == (Evict(B, 1, abort=False),)
    assert states(p)["a"] == (1, CommState.READY, 1)


def test_pairs_being_built_are_never_evicted() -> None:
    p = pool(1)
    creating = p.acquire(A, 100.0, 0.0)
    assert isinstance(creating, Create)
    p.release(creating.lease, 1.0)  # the creator gave up its lease, the build is still under way
    refused = p.acquire(B, 100.0, 2.0)
    assert isinstance(refused, Refuse)


def test_refusal_when_nothing_can_be_freed_changes_nothing() -> None:
    p = pool(2)
    for peer in (A, B):
        decision = p.acquire(peer, 100.0, 0.0)
        assert isinstance(decision, Create)
        p.created(peer.instance_id, 1, 1)
    before = states(p)
    refused = p.acquire(C, 100.0, 1.0)
    assert isinstance(refused, Refuse) and refused.peer == C
    assert "budget" in refused.reason and "in flight" in refused.reason
    assert states(p) == before
    assert p.used_bytes == 200 * MB


def test_released_pair_becomes_evictable() -> None:
    p = pool(1)
    decision = p.acquire(A, 100.0, 0.0)
    assert isinstance(decision, Create) and p.created("a", 1, 1)
    assert isinstance(p.acquire(B, 100.0, 1.0), Refuse)
    assert p.release(decision.lease, 2.0)
    again = p.acquire(B, 100.0, 3.0)
    assert isinstance(again, Create) and again.evict == (Evict(A, 1, abort=False),)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="fits no communicator"):
        PoolConfig(budget_bytes=10, comm_bytes=11)
    with pytest.raises(ValueError, match="comm_bytes"):
        PoolConfig(budget_bytes=10, comm_bytes=0)


# Abort, rebuild, generations.


def test_abort_fails_every_lease_and_the_next_acquire_rebuilds_a_new_generation() -> None:
    p = pool(2)
    first = p.acquire(A, 100.0, 0.0)
    assert isinstance(first, Create) and p.created("a", 1, 1)
    second = p.acquire(A, 100.0, 1.0)
    assert isinstance(second, Reuse)
    abort = p.abort("a", 1, "peer stalled")
    assert abort is not None and abort.failed == (first.lease, second.lease) and abort.reason == "peer stalled"
    assert states(p) == {"a": (1, CommState.BROKEN, 0)}
    assert p.used_bytes == 0  # ncclCommAbort freed it
    rebuilt = p.acquire(A, 100.0, 2.0)
    assert isinstance(rebuilt, Create) and rebuilt.lease.generation == 2 and rebuilt.evict == ()


def test_abort_is_idempotent_and_ignores_stale_generations() -> None:
    p = pool(2)
    built(p, A, 0.0)
    assert p.abort("a", 1, "x") is not None
    assert p.abort("a", 1, "again") is None
    assert p.abort("zz", 1, "unknown peer") is None
    assert isinstance(p.acquire(A, 100.0, 1.0), Create)
    assert p.abort("a", 1, "late abort of the old generation") is None
    assert states(p)["a"] == (2, CommState.CREATING, 1)


def test_stale_completions_from_an_aborted_communicator_are_ignored() -> None:
    p = pool(2)
    old = p.acquire(A, 100.0, 0.0)
    assert isinstance(old, Create) and p.created("a", 1, 1)
    p.abort("a", 1, "stalled")
    new = p.acquire(A, 100.0, 1.0)
    assert isinstance(new, Create)
    assert not p.release(old.lease, 2.0)  # the old generation's transfer finishing late
    assert not p.created("a", 1, 1)  # nor does a late build of the old generation count
    assert states(p)["a"] == (2, CommState.CREATING, 1)
    assert p.created("a", 2, 2) and p.release(new.lease, 3.0)
    assert not p.release(new.lease, 4.0)  # twice: the second is stale
    assert states(p)["a"] == (2, CommState.READY, 0)


def test_generations_are_never_reused_even_after_eviction() -> None:
    p = pool(1)
    built(p, A, 0.0)
    built(p, B, 1.0)  # evicts A
    decision = p.acquire(A, 100.0, 2.0)  # evicts B, rebuilds A
    assert isinstance(decision, Create) and decision.lease.generation == 2


def test_overdue_aborts_the_whole_pair_of_a_late_transfer() -> None:
    p = pool(3)
    late = p.acquire(A, 5.0, 0.0)
    assert isinstance(late, Create) and p.created("a", 1, 1)
    on_time = p.acquire(A, 50.0, 1.0)
    other = p.acquire(B, 50.0, 1.0)
    assert isinstance(on_time, Reuse) and isinstance(other, Create)
    assert p.overdue(4.999) == []
    aborts = p.overdue(5.0)  # the deadline itself is late
    assert len(aborts) == 1 and aborts[0].peer == A and aborts[0].generation == 1
    assert aborts[0].failed == (late.lease, on_time.lease)  # one stuck op blocks the stream for both
    assert "deadline" in aborts[0].reason
    assert p.overdue(6.0) == []  # already broken: not aborted twice
    assert states(p)["b"] == (1, CommState.CREATING, 1)


def test_overdue_orders_aborts_by_peer() -> None:
    p = pool(3)
    for peer in (C, A, B):
        p.acquire(peer, 1.0, 0.0)
    assert [abort.peer for abort in p.overdue(2.0)] == [A, B, C]


def test_a_restarted_peer_aborts_the_old_communicator() -> None:
    p = pool(2)
    old = p.acquire(A, 100.0, 0.0)
    assert isinstance(old, Create) and p.created("a", 1, 1)
    decision = p.acquire(Endpoint("a", 1), 100.0, 1.0)
    assert isinstance(decision, Create)
    assert decision.evict == (Evict(A, 1, abort=True),)
    assert decision.lease.generation == 2 and decision.lease.peer == Endpoint("a", 1)
    assert not p.release(old.lease, 2.0)
    stale = p.acquire(A, 100.0, 3.0)
    assert isinstance(stale, Refuse) and "stale" in stale.reason


def test_observe_aborts_the_receivers_communicator_when_the_sender_rebuilt() -> None:
    p = pool(2)
    lease = p.acquire(A, 100.0, 0.0)
    assert isinstance(lease, Create) and p.created("a", 1, maker_generation=7)
    assert p.observe("a", 7) is None and p.observe("a", 6) is None
    abort = p.observe("a", 8)
    assert abort is not None and abort.failed == (lease.lease,)
    assert p.observe("a", 9) is None  # already broken
    assert p.observe("nobody", 1) is None


def test_drop_tears_down_busy_pairs_by_abort_and_idle_ones_by_destroy() -> None:
    p = pool(3)
    built(p, A, 0.0)
    busy = p.acquire(B, 100.0, 0.0)
    assert isinstance(busy, Create) and p.created("b", 1, 1)
    p.acquire(C, 100.0, 0.0)  # still being built
    assert p.drop("a") == Evict(A, 1, abort=False)
    assert p.drop("b") == Evict(B, 1, abort=True)
    assert p.drop("c") == Evict(C, 1, abort=True)
    assert p.drop("a") is None and p.pairs() == [] and p.used_bytes == 0
    assert not p.release(busy.lease, 1.0)


# Keys and matching.


def test_keys_are_built_identically_on_both_sides_and_round_trip() -> None:
    key = TransferKey("req/with@odd/chars", 3, 17)
    assert key.encode() == b"req/with@odd/chars@3/17"
    assert TransferKey.decode(key.encode()) == key
    assert TransferKey("req-1", 0, 2).slot == TransferKey("req-1", 9, 2).slot == b"req-1/2"
    assert TransferKey("req-1", 0, 2).encode() != TransferKey("req-1", 1, 2).encode()
    for raw in (b"no-epoch/1", b"r@x/1", b"r@1/y", b"@1/2"):
        with pytest.raises(ValueError, match="not a transfer key"):
            TransferKey.decode(raw)
    with pytest.raises(ValueError):
        TransferKey("", 0, 0)
    with pytest.raises(ValueError):
        TransferKey("r", -1, 0)


KEY = TransferKey("r1", 4, 0)


def test_match_gives_go_with_the_sequence_and_common_chunks() -> None:
    go = match(Expect(KEY, (64, 64), 10.0), Offer(KEY, (32, 96), 2), comm_generation=2, seq=5, now=1.0)
    assert go == Go(KEY, (32, 32, 64), seq=5, maker_generation=2)


def test_a_receive_for_one_epoch_rejects_a_send_from_another() -> None:
    other = TransferKey("r1", 5, 0)
    answer = match(Expect(KEY, (64,), 10.0), Offer(other, (64,), 2), 2, 0, 1.0)
    assert isinstance(answer, Reject) and answer.code is RejectCode.EPOCH and answer.key == other
    assert "epoch 4" in answer.reason and "epoch 5" in answer.reason


def test_match_checks_deadline_size_and_communicator_in_that_order() -> None:
    expect = Expect(KEY, (64,), 10.0)
    late = match(expect, Offer(KEY, (99,), 1), 2, 0, 10.0)
    assert isinstance(late, Reject) and late.code is RejectCode.DEADLINE
    size = match(expect, Offer(KEY, (99,), 1), 2, 0, 9.0)
    assert isinstance(size, Reject) and size.code is RejectCode.SIZE and size.posted == 64
    comm = match(expect, Offer(KEY, (64,), 1), 2, 0, 9.0)
    assert isinstance(comm, Reject) and comm.code is RejectCode.COMM
    with pytest.raises(ValueError, match="matched against"):
        match(expect, Offer(TransferKey("r2", 4, 0), (64,), 2), 2, 0, 9.0)


def test_send_order_hands_gos_out_strictly_by_sequence() -> None:
    order = SendOrder(maker_generation=3)
    gos = [Go(TransferKey("r", 0, i), (8,), i, 3) for i in range(4)]
    assert order.add(gos[2]) == [] and order.add(gos[1]) == []
    assert order.waiting == 2
    assert order.add(gos[0]) == gos[:3]
    assert order.add(gos[3]) == [gos[3]] and order.waiting == 0
    with pytest.raises(OutOfOrder, match="twice"):
        order.add(gos[1])
    with pytest.raises(OutOfOrder, match="communicator"):
        order.add(Go(KEY, (8,), 4, 2))


def test_refine_cuts_both_partitions_at_every_boundary() -> None:
    assert refine((10, 20, 30), (30, 30)) == (10, 20, 30)
    assert refine((25, 35), (10, 20, 30)) == (10, 15, 5, 30)
    assert refine((0, 8, 0), (8,)) == (8,)
    assert refine((), ()) == ()
    with pytest.raises(ValueError, match="same message"):
        refine((8,), (9,))


def test_split_lines_each_side_up_with_the_chunks() -> None:
    chunks = refine((25, 35), (10, 20, 30))
    assert split([(1000, 25), (5000, 35)], chunks) == [(1000, 10), (1010, 15), (5000, 5), (5005, 30)]
    assert split([(0, 10), (100, 20), (300, 30)], chunks) == [(0, 10), (100, 15), (115, 5), (300, 30)]
    with pytest.raises(ValueError, match="crosses"):
        split([(0, 10)], (20,))
    with pytest.raises(ValueError, match="more than"):
        split([(0, 10)], (10, 5))
    with pytest.raises(ValueError, match="do not cover"):
        split([(0, 10), (50, 5)], (10,))


def test_same_gpu_pairs_take_another_path() -> None:
    assert choose_path("gpu-0", "gpu-1") == "nccl"
    assert choose_path("gpu-0", "gpu-0") == "same-device"
    with pytest.raises(ValueError):
        choose_path("", "gpu-0")
    assert issubclass(SameDevice, TransportError) and issubclass(SameDevice, NotImplementedError)


# The shell's CPU-side helpers.


def test_unique_ids_cross_the_wire_unchanged() -> None:
    uid = tuple(range(-128, 0))
    raw = id_to_bytes(uid)
    assert len(raw) == 128 and id_from_bytes(raw) == uid


class _DeviceArray:
    """Just the CUDA array interface of a device array (its address is never dereferenced here)."""

    def __init__(self, shape: tuple[int, ...], strides: tuple[int, ...] | None, ptr: int = 4096) -> None:
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "<f2", "strides": strides, "data": (ptr, False)}


def test_device_spans_reads_addresses_and_sizes_and_refuses_strided_buffers() -> None:
    assert device_spans([_DeviceArray((4, 8), None), _DeviceArray((2, 3), (6, 2), 8192)], 0) == [
        (4096, 64), (8192, 12)
    ]
    with pytest.raises(ValueError, match="C-contiguous"):
        device_spans([_DeviceArray((4, 8), (2, 8))], 0)
