"""The NCCL transport's keys and matching, as pure data: which message goes on which stream, in which order.

Roles. NCCL matches sends and receives between two ranks by order alone, with no tags. So a link is one-way
(prefill sends, decode receives) and the receiver orders it: the sender announces each message on the control
plane (`Offer`), the receiver `match`es it against the destination it posted (`Expect`) and answers `Go` with
the next sequence number (or `Reject`); both sides then put the operation on their stream in sequence order
(`SendOrder` on the sender). Nothing reaches NCCL until both sides agree on key, epoch and size.

The sender is rank 0 and makes the unique id of each generation; the receiver joins. The id travels with the
sender's generation (`maker_generation`); a receiver that sees an offer from a newer maker generation than its
communicator was built from aborts its own (`observe`), since the sender has moved on to a new communicator.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

SENDER_RANK, RECEIVER_RANK = 0, 1  # the sender makes each generation's unique id


@dataclass(frozen=True, slots=True)
class TransferKey:
    """One layer of one request's KV from one sender incarnation; built the same way on both sides."""

    request_id: str
    epoch: int  # the sender's epoch
    layer: int

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("a transfer key needs a non-empty request id")
        if self.epoch < 0 or self.layer < 0:
            raise ValueError(f"epoch and layer must be >= 0, got {self.epoch} and {self.layer}")

    @property
    def slot(self) -> bytes:
        """What the receiver waits on, the epoch left out so that a send from another incarnation is seen and
        refused (`match`) instead of waiting out the deadline unclaimed."""
        return f"{self.request_id}/{self.layer}".encode()

    def encode(self) -> bytes:
        return f"{self.request_id}@{self.epoch}/{self.layer}".encode()

    @staticmethod
    def decode(raw: bytes) -> TransferKey:
        """The key `encode` made; a request id may itself hold '@' and '/'."""
        head, _, layer = raw.decode().rpartition("/")
        request_id, _, epoch = head.rpartition("@")
        if not request_id or not epoch.isdigit() or not layer.isdigit():
            raise ValueError(f"not a transfer key: {raw!r}")
        return TransferKey(request_id, int(epoch), int(layer))


@dataclass(frozen=True, slots=True)
class Expect:
    """The receiver's posted destination for `key`: spans of `sizes` bytes, to land before `deadline`."""

    key: TransferKey
    sizes: tuple[int, ...]
    deadline: float

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True, slots=True)
class Offer:
    """The sender's announcement of `key`: spans of `sizes` bytes, on its communicator of `maker_generation`."""

    key: TransferKey
    sizes: tuple[int, ...]
    maker_generation: int

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True, slots=True)
class Go:
    """Both sides put `key`'s operations on their stream as number `seq` of communicator `maker_generation`,
    one send or receive per entry of `chunks` (NCCL pairs operations one to one, sizes included)."""

    key: TransferKey
    chunks: tuple[int, ...]
    seq: int
    maker_generation: int


class RejectCode(enum.Enum):
    EPOCH = "epoch"  # the receive waits on: another offer, from the right incarnation, may still come
    DEADLINE = "deadline"
    SIZE = "size"
    COMM = "comm"  # the two sides are on different communicators: the older one must go


@dataclass(frozen=True, slots=True)
class Reject:
    key: TransferKey
    code: RejectCode
    reason: str
    posted: int = -1  # the destination's size, for a SIZE rejection


def match(expect: Expect, offer: Offer, comm_generation: int, seq: int, now: float) -> Go | Reject:
    """The receiver's answer to `offer` for the destination it posted, on its communicator `comm_generation`
    whose next sequence number is `seq`. The checks, in order: same slot, same sender epoch, deadline not
    passed, same total size, same communicator."""
    want, got = expect.key, offer.key
    if want.slot != got.slot:
        raise ValueError(f"offer {got} matched against the destination of {want}")
    if got.epoch != want.epoch:
        why = f"a receive posted for sender epoch {want.epoch} refuses a send from epoch {got.epoch}"
        return Reject(got, RejectCode.EPOCH, why)
    if now >= expect.deadline:
        return Reject(got, RejectCode.DEADLINE, f"the transfer's deadline passed {now - expect.deadline:.3f}s ago")
    if offer.nbytes != expect.nbytes:
        why = f"the sender offers {offer.nbytes} bytes, the destination posted holds {expect.nbytes}"
        return Reject(got, RejectCode.SIZE, why, expect.nbytes)
    if offer.maker_generation != comm_generation:
        why = f"the sender is on communicator {offer.maker_generation}, the receiver on {comm_generation}"
        return Reject(got, RejectCode.COMM, why)
    return Go(got, refine(offer.sizes, expect.sizes), seq, comm_generation)


def refine(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """The chunk sizes that split both `a` and `b` (two partitions of the same byte count) at every one of
    their boundaries: each side's spans cut at these chunks line up one to one. Empty spans are skipped."""
    if sum(a) != sum(b) or min(a, default=0) < 0 or min(b, default=0) < 0:
        raise ValueError(f"spans of {sum(a)} and {sum(b)} bytes do not partition the same message")
    cuts = sorted(set(_ends(a)) | set(_ends(b)))
    return tuple(hi - lo for lo, hi in zip([0, *cuts], cuts, strict=False) if hi > lo)


def split(spans: list[tuple[int, int]], chunks: tuple[int, ...]) -> list[tuple[int, int]]:
    """`spans` ((address, size) each, in message order) cut into `chunks` (from `refine`): (address, size)."""
    out: list[tuple[int, int]] = []
    spans_left = [(addr, size) for addr, size in spans if size]
    i = offset = 0
    for chunk in chunks:
        if i == len(spans_left):
            raise ValueError("the chunks add up to more than the spans")
        addr, size = spans_left[i]
        if offset + chunk > size:
            raise ValueError(f"chunk of {chunk} bytes crosses the end of a span of {size}")
        out.append((addr + offset, chunk))
        offset += chunk
        if offset == size:
            i, offset = i + 1, 0
    if i != len(spans_left):
        raise ValueError("the chunks do not cover the spans")
    return out


def _ends(sizes: tuple[int, ...]) -> list[int]:
    ends, total = [], 0
    for size in sizes:
        total += size
        ends.append(total)
    return ends


def choose_path(local_device: str, peer_device: str) -> str:
    """"nccl" between two GPUs, "same-device" for a pair on one GPU (NCCL refuses two ranks on one device)."""
    if not local_device or not peer_device:
        raise ValueError("both sides' GPU UUIDs are needed to choose a path")
    return "same-device" if local_device == peer_device else "nccl"


class OutOfOrder(Exception):
    """A `Go` that would put the sender's stream out of step with the receiver's: the communicator must go."""


class SendOrder:
    """The sender's side of the sequence: `Go`s arrive from the receiver, possibly handled out of order by
    several threads; `ready` hands them out strictly by `seq`, so the two streams see the same order."""

    __slots__ = ("_next", "_pending", "maker_generation")

    def __init__(self, maker_generation: int) -> None:
        self.maker_generation = maker_generation
        self._next = 0
        self._pending: dict[int, Go] = {}

    def add(self, go: Go) -> list[Go]:
        """Record `go`; returns the `Go`s now due on the stream, in order."""
        if go.maker_generation != self.maker_generation:
            raise OutOfOrder(f"go for communicator {go.maker_generation} on communicator {self.maker_generation}")
        if go.seq < self._next or go.seq in self._pending:
            raise OutOfOrder(f"sequence number {go.seq} given twice")
        self._pending[go.seq] = go
        due: list[Go] = []
        while self._next in self._pending:
            due.append(self._pending.pop(self._next))
            self._next += 1
        return due

    @property
    def waiting(self) -> int:
        """Gos held back behind a missing one (a gap that never fills ends in the deadline's abort)."""
        return len(self._pending)
