"""Block accounting: which KV blocks each side holds for which request, and freeing every one exactly once.

`BlockLedger` is one side's book (the prefill's KV, or the decode's receive buffer). Allocating a block already
held raises `BlockInUse`; freeing a block not held (a second time, or never allocated) raises `DoubleFree`.
Those are bugs in the caller, not messages to refuse, hence their own root `LedgerError`.

`TicketTable` keeps every `TransferTicket` with its blocks on both sides, and is the one place that releases
them: the transition that makes a ticket terminal releases its blocks on both sides, and a ticket turns terminal
once, so its blocks are released once. Each release is queued as a `Release` that the shell drains and turns
into frees on the workers (a dead incarnation's blocks died with it: the shell skips those sends, the ledger
still counts them released). Invariant: once every ticket is terminal both ledgers are empty, and every block
allocated appeared in exactly one drained `Release`.

What the table does with a message, in order:
1. fence: a stale sender epoch raises `StaleEpoch`; a newer one means that instance restarted, so the live
   tickets of its older incarnations are aborted (or expired, if already past due);
2. the sender must be one of the ticket's two endpoints, on the side `sender_side` allows, else `WrongSender`;
3. a live ticket past its due time is expired first, so outcomes do not depend on how often `sweep` runs;
4. an abort of a ticket already terminal is a no-op (abort crossing a consume, an expiry or the other side's
   abort is an ordinary race); any other event goes through `transition`, which raises if it is illegal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kv_transfer.experimental.ticket import (
    Abort,
    Endpoint,
    Epochs,
    Event,
    Expire,
    Side,
    TicketState,
    TransferError,
    TransferTicket,
    sender_side,
    transition,
)


class LedgerError(Exception):
    """Block accounting broken: a bug in whoever called, never a message to refuse."""


class DoubleFree(LedgerError):
    pass


class BlockInUse(LedgerError):
    pass


class BlockLedger:
    """One side's blocks, per request."""

    __slots__ = ("_held", "_owner", "side")

    def __init__(self, side: str) -> None:
        self.side = side
        self._held: dict[str, list[int]] = {}
        self._owner: dict[int, str] = {}

    def allocate(self, request_id: str, blocks: Sequence[int]) -> None:
        if not blocks:
            raise ValueError(f"{self.side}: request {request_id!r} allocates no blocks")
        if len(set(blocks)) != len(blocks):
            raise BlockInUse(f"{self.side}: request {request_id!r} lists a block twice: {list(blocks)}")
        for block in blocks:
            if block in self._owner:
                raise BlockInUse(
                    f"{self.side}: block {block} for request {request_id!r} is held by {self._owner[block]!r}"
                )
        for block in blocks:
            self._owner[block] = request_id
        self._held.setdefault(request_id, []).extend(blocks)

    def free(self, request_id: str, blocks: Sequence[int]) -> None:
        """Free some of a request's blocks; all of them must be held by it, else nothing is freed."""
        gone = set(blocks)
        stray = [b for b in blocks if self._owner.get(b) != request_id]
        if stray or len(gone) != len(blocks):
            raise DoubleFree(f"{self.side}: request {request_id!r} frees blocks it does not hold: {list(blocks)}")
        for block in gone:
            del self._owner[block]
        kept = [b for b in self._held.get(request_id, []) if b not in gone]
        if kept:
            self._held[request_id] = kept
        else:
            self._held.pop(request_id, None)

    def release(self, request_id: str) -> tuple[int, ...]:
        """Free every block the request holds and return them."""
        blocks = self._held.pop(request_id, None)
        if blocks is None:
            raise DoubleFree(f"{self.side}: request {request_id!r} holds no blocks (already released?)")
        for block in blocks:
            del self._owner[block]
        return tuple(blocks)

    def held(self, request_id: str) -> tuple[int, ...]:
        return tuple(self._held.get(request_id, ()))

    def outstanding(self) -> dict[str, tuple[int, ...]]:
        return {rid: tuple(blocks) for rid, blocks in self._held.items()}


class UnknownTicket(TransferError):
    def __init__(self, request_id: str) -> None:
        super().__init__(f"no transfer ticket for request {request_id!r} (never opened, or already forgotten)")
        self.request_id = request_id


class DuplicateTicket(TransferError):
    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id!r} already has a transfer ticket")
        self.request_id = request_id


class WrongSender(TransferError):
    def __init__(self, request_id: str, sender: Endpoint, why: str) -> None:
        super().__init__(f"request {request_id!r}: message from {sender} refused: {why}")
        self.request_id = request_id
        self.sender = sender


@dataclass(frozen=True, slots=True)
class Release:
    """A ticket that just turned terminal, with the blocks each side may now free. Emitted once per ticket."""

    ticket: TransferTicket
    prefill_blocks: tuple[int, ...]
    decode_blocks: tuple[int, ...]


class TicketTable:
    """Every transfer in flight, keyed by request id, with the blocks they hold. Pure: the caller passes `now`."""

    __slots__ = ("_epochs", "_ledgers", "_outbox", "_tickets")

    def __init__(self) -> None:
        self._tickets: dict[str, TransferTicket] = {}
        self._epochs = Epochs()
        self._ledgers = {Side.PREFILL: BlockLedger("prefill"), Side.DECODE: BlockLedger("decode")}
        self._outbox: list[Release] = []

    def open(
        self, ticket: TransferTicket, prefill_blocks: Sequence[int], decode_blocks: Sequence[int], now: float
    ) -> None:
        """Start tracking a PENDING ticket that holds `prefill_blocks` and `decode_blocks` (num_blocks each)."""
        rid = ticket.request_id
        if ticket.state is not TicketState.PENDING:
            raise ValueError(f"request {rid!r}: open a PENDING ticket, not {ticket.state.name}")
        if rid in self._tickets:
            raise DuplicateTicket(rid)
        if len(prefill_blocks) != ticket.num_blocks or len(decode_blocks) != ticket.num_blocks:
            raise ValueError(
                f"request {rid!r}: expected {ticket.num_blocks} blocks per side, got "
                f"{len(prefill_blocks)} prefill and {len(decode_blocks)} decode"
            )
        for endpoint in (ticket.prefill, ticket.decode):
            self._admit(endpoint, now)
        self._ledgers[Side.PREFILL].allocate(rid, prefill_blocks)
        try:
            self._ledgers[Side.DECODE].allocate(rid, decode_blocks)
        except LedgerError:
            self._ledgers[Side.PREFILL].release(rid)  # all or nothing: no half-opened ticket leaks blocks
            raise
        self._tickets[rid] = ticket

    def apply(self, request_id: str, sender: Endpoint, event: Event, now: float) -> TransferTicket:
        """Apply a worker's message (see the module docstring for the order of checks); returns the ticket."""
        self._admit(sender, now)
        ticket = self.get(request_id)
        side = ticket.side_of(sender)
        if side is None:
            raise WrongSender(request_id, sender, f"not a party to the transfer {ticket.prefill} -> {ticket.decode}")
        allowed = sender_side(event)
        if allowed is not side:
            who = "no worker: expiry is the clock's" if allowed is None else f"the {allowed.value} side only"
            raise WrongSender(request_id, sender, f"{event} may come from {who}")
        ticket = self._settle(ticket, now)
        if ticket.is_terminal and isinstance(event, Abort):
            return ticket
        return self._store(transition(ticket, event, now))

    def fence(self, incarnation: Endpoint, now: float) -> list[TransferTicket]:
        """Record a (re)started incarnation; returns the older incarnations' tickets this ended."""
        return self._admit(incarnation, now)

    def sweep(self, now: float) -> list[TransferTicket]:
        """Expire every live ticket past its due time; returns them, expired."""
        # A linear scan: the table holds the requests in flight on one router, and sweeps are not per token.
        overdue = [t for t in self._tickets.values() if not t.is_terminal and now >= t.due_at]
        return [self._store(transition(t, Expire(), now)) for t in overdue]

    def drain(self) -> list[Release]:
        """Releases since the last drain, oldest first; each is handed out once."""
        out, self._outbox = self._outbox, []
        return out

    def get(self, request_id: str) -> TransferTicket:
        try:
            return self._tickets[request_id]
        except KeyError:
            raise UnknownTicket(request_id) from None

    def tickets(self) -> list[TransferTicket]:
        return list(self._tickets.values())

    def forget(self, request_id: str) -> None:
        """Drop a terminal ticket; later messages for it raise `UnknownTicket`."""
        if not self.get(request_id).is_terminal:
            raise ValueError(f"request {request_id!r}: cannot forget a live ticket; abort it first")
        del self._tickets[request_id]

    def outstanding(self, side: Side) -> dict[str, tuple[int, ...]]:
        return self._ledgers[side].outstanding()

    def current_epoch(self, instance_id: str) -> int | None:
        return self._epochs.current(instance_id)

    def _admit(self, endpoint: Endpoint, now: float) -> list[TransferTicket]:
        if not self._epochs.admit(endpoint):
            return []
        ended: list[TransferTicket] = []
        for ticket in list(self._tickets.values()):
            for side in Side:
                old = ticket.endpoint(side)
                if ticket.is_terminal or old.instance_id != endpoint.instance_id or old.epoch >= endpoint.epoch:
                    continue
                ticket = self._settle(ticket, now)
                if not ticket.is_terminal:
                    why = f"{side.value} instance restarted: epoch {old.epoch} superseded by {endpoint.epoch}"
                    ticket = self._store(transition(ticket, Abort(side, why), now))
                ended.append(ticket)
        return ended

    def _settle(self, ticket: TransferTicket, now: float) -> TransferTicket:
        if ticket.is_terminal or now < ticket.due_at:
            return ticket
        return self._store(transition(ticket, Expire(), now))

    def _store(self, ticket: TransferTicket) -> TransferTicket:
        rid = ticket.request_id
        was_terminal = self._tickets[rid].is_terminal
        self._tickets[rid] = ticket
        if ticket.is_terminal and not was_terminal:
            # The only release point; a ticket turns terminal once, so its blocks are released once.
            prefill = self._ledgers[Side.PREFILL].release(rid)
            self._outbox.append(Release(ticket, prefill, self._ledgers[Side.DECODE].release(rid)))
        return ticket
