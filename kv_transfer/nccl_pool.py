"""The NCCL transport's pool of pair communicators, as pure data (the matching of transfers: `nccl_keys`).

`CommPool` is one worker's pool of pair communicators (one per peer instance), under a GPU memory budget:

    absent --acquire--> CREATING --created--> READY --(idle, LRU, budget)--> evicted (destroyed)
                           |                    |
                           +----abort/overdue---+--> BROKEN --acquire--> CREATING (generation + 1)

- `acquire(peer, deadline, now)` answers `Reuse` (a lease on the live communicator), `Create` (build a new
  generation, after destroying the idle pairs listed in `evict`, least recently used first) or `Refuse` (the
  budget cannot fit another communicator even with every idle pair evicted). Pairs with a lease out are never
  evicted; a `Refuse` changes nothing.
- Every lease carries its transfer's deadline. `overdue(now)` aborts each pair with a lease past it: one stuck
  NCCL operation blocks its whole stream, so the unit of abort is the communicator, not the transfer, and every
  lease out on it fails. `abort` is idempotent and ignores an older generation.
- Generations grow per peer and are never reused. A completion (`release`) or a `created` for a generation that
  is no longer current is stale and ignored, so a late event from an aborted communicator touches nothing.
- A peer seen with a newer epoch has restarted: its old communicator is aborted, whatever was in flight on it
  fails. An older epoch is refused.
- A BROKEN pair was aborted by the shell (`ncclCommAbort` frees its memory), so it costs nothing.

Who aborts: each side aborts its own communicator when one of its own leases passes its deadline (an abort is
local, and no message reaches a stuck stream). The receiver's deadline is the transfer ticket's; the receiver
fails the ticket (`Abort(Side.DECODE, ...)`), the sender reports only its own failures. Nothing here reads a
clock or does I/O.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from kv_transfer.endpoint import Endpoint


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """`budget_bytes`: GPU memory for communicators; `comm_bytes`: what one communicator costs (NCCL's buffers
    and its proxy state, on the order of 100 MB with default settings)."""

    budget_bytes: int
    comm_bytes: int

    def __post_init__(self) -> None:
        if self.comm_bytes < 1:
            raise ValueError(f"comm_bytes must be >= 1, got {self.comm_bytes}")
        if self.budget_bytes < self.comm_bytes:
            raise ValueError(f"a budget of {self.budget_bytes} bytes fits no communicator of {self.comm_bytes}")


class CommState(enum.Enum):
    CREATING = "creating"
    READY = "ready"
    BROKEN = "broken"


@dataclass(frozen=True, slots=True)
class Lease:
    """One transfer's hold on a pair's communicator of `generation`, until `release` or an abort."""

    peer: Endpoint
    generation: int
    lease_id: int
    deadline: float


@dataclass(frozen=True, slots=True)
class Evict:
    """Tear down the communicator to `peer` of `generation`: `ncclCommAbort` if `abort`, else destroy it."""

    peer: Endpoint
    generation: int
    abort: bool


@dataclass(frozen=True, slots=True)
class Reuse:
    """A lease on the live communicator; when another transfer is still building it, wait for that."""

    lease: Lease


@dataclass(frozen=True, slots=True)
class Create:
    """Build `lease.generation` for `lease.peer` (after tearing down `evict`, in order) and report `created`."""

    lease: Lease
    evict: tuple[Evict, ...]


@dataclass(frozen=True, slots=True)
class Refuse:
    peer: Endpoint
    reason: str


Decision = Reuse | Create | Refuse


@dataclass(frozen=True, slots=True)
class Abort:
    """Call `ncclCommAbort` on `peer`'s communicator of `generation`; the leases `failed` fail with `reason`."""

    peer: Endpoint
    generation: int
    failed: tuple[Lease, ...]
    reason: str


@dataclass(slots=True)
class _Pair:
    peer: Endpoint
    generation: int
    state: CommState
    last_used: float
    maker_generation: int = -1  # the sender's generation of the unique id it was built from; -1 until built
    leases: dict[int, Lease] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PairView:
    peer: Endpoint
    generation: int
    state: CommState
    leases: int
    last_used: float
    maker_generation: int = -1  # the sender's generation it was built from; -1 until built


class CommPool:
    """One worker's communicators, one per peer instance. See the module docstring for the state machine."""

    __slots__ = ("_generations", "_next_lease", "_pairs", "config")

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self._pairs: dict[str, _Pair] = {}
        self._generations: dict[str, int] = {}  # the last generation per peer instance, never reset
        self._next_lease = 0

    def acquire(self, peer: Endpoint, deadline: float, now: float) -> Decision:
        if math.isnan(deadline):
            raise ValueError("a lease's deadline must be a number")
        pair = self._pairs.get(peer.instance_id)
        restarted: Evict | None = None
        if pair is not None and peer.epoch < pair.peer.epoch:
            return Refuse(peer, f"epoch {peer.epoch} is stale: {pair.peer} is the current incarnation")
        if pair is not None and peer.epoch > pair.peer.epoch:
            if pair.state is not CommState.BROKEN:
                restarted = Evict(pair.peer, pair.generation, abort=True)  # what was in flight died with it
            pair = None
        elif pair is not None and pair.state is not CommState.BROKEN:
            pair.last_used = max(pair.last_used, now)
            return Reuse(self._lease(pair, deadline))
        evict = self._room_for(peer.instance_id)
        if evict is None:
            return Refuse(peer, self._full_reason())
        if restarted is not None:
            evict = [restarted, *evict]
        for gone in evict:
            del self._pairs[gone.peer.instance_id]
        generation = self._generations.get(peer.instance_id, 0) + 1
        self._generations[peer.instance_id] = generation
        pair = self._pairs[peer.instance_id] = _Pair(peer, generation, CommState.CREATING, now)
        return Create(self._lease(pair, deadline), tuple(evict))

    def created(self, peer_id: str, generation: int, maker_generation: int) -> bool:
        """The shell built `generation`; False when it is stale (the shell destroys what it built)."""
        pair = self._current(peer_id, generation)
        if pair is None or pair.state is not CommState.CREATING:
            return False
        pair.state = CommState.READY
        pair.maker_generation = maker_generation
        return True

    def release(self, lease: Lease, now: float) -> bool:
        """A transfer is done with its lease; False (and nothing changes) when the lease is stale."""
        pair = self._current(lease.peer.instance_id, lease.generation)
        if pair is None or pair.leases.pop(lease.lease_id, None) is None:
            return False
        pair.last_used = max(pair.last_used, now)
        return True

    def abort(self, peer_id: str, generation: int, reason: str) -> Abort | None:
        """Mark the pair broken: the shell aborts its communicator and fails the returned leases. None when
        `generation` is stale or already aborted."""
        pair = self._current(peer_id, generation)
        if pair is None or pair.state is CommState.BROKEN:
            return None
        pair.state = CommState.BROKEN
        failed = tuple(sorted(pair.leases.values(), key=lambda lease: lease.lease_id))
        pair.leases.clear()
        return Abort(pair.peer, generation, failed, reason)

    def overdue(self, now: float) -> list[Abort]:
        """Abort every pair with a lease at or past its deadline (by peer instance id)."""
        aborts: list[Abort] = []
        for peer_id in sorted(self._pairs):
            pair = self._pairs[peer_id]
            late = [lease for lease in pair.leases.values() if now >= lease.deadline]
            if late and pair.state is not CommState.BROKEN:
                first = min(late, key=lambda lease: (lease.deadline, lease.lease_id))
                why = f"a transfer on the link to {pair.peer} passed its deadline {now - first.deadline:.3f}s ago"
                done = self.abort(peer_id, pair.generation, why)
                if done is not None:
                    aborts.append(done)
        return aborts

    def observe(self, peer_id: str, maker_generation: int) -> Abort | None:
        """Receiver: the sender offered on its communicator `maker_generation`. A newer one than ours was built
        from means the sender rebuilt: ours is dead, abort it so the next acquire joins the new one."""
        pair = self._pairs.get(peer_id)
        if pair is None or pair.state is not CommState.READY or maker_generation <= pair.maker_generation:
            return None
        return self.abort(peer_id, pair.generation, f"the sender moved to communicator {maker_generation}")

    def drop(self, peer_id: str) -> Evict | None:
        """Forget the pair (the peer left for good); its leases fail with the teardown."""
        pair = self._pairs.pop(peer_id, None)
        if pair is None or pair.state is CommState.BROKEN:
            return None
        return Evict(pair.peer, pair.generation, abort=bool(pair.leases) or pair.state is CommState.CREATING)

    @property
    def used_bytes(self) -> int:
        live = sum(1 for pair in self._pairs.values() if pair.state is not CommState.BROKEN)
        return live * self.config.comm_bytes

    def pairs(self) -> list[PairView]:
        return [
            PairView(p.peer, p.generation, p.state, len(p.leases), p.last_used, p.maker_generation)
            for _, p in sorted(self._pairs.items())
        ]

    def _current(self, peer_id: str, generation: int) -> _Pair | None:
        pair = self._pairs.get(peer_id)
        return pair if pair is not None and pair.generation == generation else None

    def _lease(self, pair: _Pair, deadline: float) -> Lease:
        self._next_lease += 1
        lease = Lease(pair.peer, pair.generation, self._next_lease, deadline)
        pair.leases[lease.lease_id] = lease
        return lease

    def _room_for(self, peer_id: str) -> list[Evict] | None:
        """The idle pairs to destroy, least recently used first, so one more communicator fits; None if even
        all of them would not make room. The pair being rebuilt (`peer_id`) is not counted: it is replaced."""
        live = [p for pid, p in self._pairs.items() if pid != peer_id and p.state is not CommState.BROKEN]
        over = (len(live) + 1) * self.config.comm_bytes - self.config.budget_bytes
        if over <= 0:
            return []
        idle = sorted(
            (p for p in live if p.state is CommState.READY and not p.leases),
            key=lambda p: (p.last_used, p.peer.instance_id),
        )
        needed = -(-over // self.config.comm_bytes)
        if needed > len(idle):
            return None
        return [Evict(p.peer, p.generation, abort=False) for p in idle[:needed]]

    def _full_reason(self) -> str:
        busy = sum(1 for p in self._pairs.values() if p.state is not CommState.BROKEN)
        return (
            f"the communicator budget of {self.config.budget_bytes} bytes is full: {busy} communicators of "
            f"{self.config.comm_bytes} bytes, each with a transfer in flight or being built"
        )
