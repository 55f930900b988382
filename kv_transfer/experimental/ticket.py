"""`TransferTicket`: one request's KV movement from a prefill instance to a decode instance, as pure data.

State machine. `transition` is the only way a ticket changes; anything not drawn here raises `IllegalTransition`:

    PENDING --start--> STREAMING --layer_landed(last)--> LANDED --consume--> CONSUMED
                        |     ^                           |   ^
                        +-----+ layer_landed(not last)    +---+ renew (extends the lease)

    PENDING | STREAMING | LANDED --abort(side, reason)--> ABORTED
    PENDING | STREAMING | LANDED --expire (due time passed)--> EXPIRED

Contract:
- Nothing here reads a clock or does I/O: callers pass `now` (monotonic seconds) and get plain data back.
- Until the KV has landed the ticket is due at its `deadline`. Once landed, the prefill still holds its copy of
  the KV (the decode may yet fail before using it) on a lease of `lease_s`, which the decode may renew; the
  decode must consume before the lease runs out. Past the due time only abort and expire are legal, so a late
  layer or a late consume is refused no matter how often anyone sweeps.
- CONSUMED, ABORTED and EXPIRED are terminal: nothing leaves them.
- Progress (start, layers, consume, renew) is reported by the decode side, the receiver, so it arrives on one
  ordered channel; either side may abort; expiry comes from the clock and from no worker (`sender_side`).
- Fencing: every worker incarnation has an epoch that grows when the worker restarts. `Epochs` keeps the
  current one per instance and refuses a message from an older incarnation with `StaleEpoch`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace

from kv_transfer.endpoint import Endpoint, Epochs, StaleEpoch, TransferError  # noqa: F401  (its users import them here)


class TicketState(enum.Enum):
    PENDING = "pending"
    STREAMING = "streaming"
    LANDED = "landed"
    CONSUMED = "consumed"
    ABORTED = "aborted"
    EXPIRED = "expired"


TERMINAL = frozenset({TicketState.CONSUMED, TicketState.ABORTED, TicketState.EXPIRED})
LIVE = frozenset(TicketState) - TERMINAL


class Side(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


# Events: what may happen to a ticket. Plain values, so they travel in messages and compare in tests.


@dataclass(frozen=True, slots=True)
class StartStreaming:
    """The decode side began receiving the request's KV."""


@dataclass(frozen=True, slots=True)
class LayerLanded:
    """One layer's KV is complete in the decode's receive buffer. Layers may land in any order."""

    layer: int

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")


@dataclass(frozen=True, slots=True)
class Consume:
    """The decode engine took the landed KV: both sides may let go of their blocks."""


@dataclass(frozen=True, slots=True)
class Renew:
    """The decode is still coming for landed KV: keep it one more lease from now."""


@dataclass(frozen=True, slots=True)
class Abort:
    side: Side
    reason: str


@dataclass(frozen=True, slots=True)
class Expire:
    """The ticket's due time has passed; only legal once it has."""


Event = StartStreaming | LayerLanded | Consume | Renew | Abort | Expire


def sender_side(event: Event) -> Side | None:
    """The side allowed to send `event`; None for expiry, which only the clock decides."""
    if isinstance(event, Abort):
        return event.side
    if isinstance(event, Expire):
        return None
    return Side.DECODE


class IllegalTransition(TransferError):
    def __init__(self, ticket: TransferTicket, event: Event, to: TicketState, why: str) -> None:
        super().__init__(f"request {ticket.request_id!r}: illegal {ticket.state.name} -> {to.name} on {event}: {why}")
        self.request_id = ticket.request_id
        self.from_state = ticket.state
        self.to_state = to
        self.event = event


@dataclass(frozen=True, slots=True)
class TransferTicket:
    """One request's KV movement. Immutable: `transition` returns a new ticket.

    `deadline` and the times below are monotonic seconds on the caller's clock. `landed_mask` has bit i set once
    layer i has landed (an int, so a layer event costs no allocation beyond the new ticket).
    """

    request_id: str
    prefill: Endpoint
    decode: Endpoint
    num_layers: int
    num_blocks: int
    num_bytes: int
    deadline: float
    lease_s: float
    state: TicketState = TicketState.PENDING
    landed_mask: int = 0
    lease_until: float = math.inf
    started_at: float | None = None
    landed_at: float | None = None
    ended_at: float | None = None
    reason: str = ""  # why a terminal ticket ended, for the user-facing error and the logs

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("a ticket needs a non-empty request_id")
        if self.prefill.instance_id == self.decode.instance_id:
            raise ValueError(f"request {self.request_id!r}: prefill and decode are both {self.prefill.instance_id!r}")
        if self.num_layers < 1 or self.num_blocks < 1 or self.num_bytes < 0:
            raise ValueError(
                f"request {self.request_id!r}: need num_layers >= 1, num_blocks >= 1, num_bytes >= 0; got "
                f"{self.num_layers}, {self.num_blocks}, {self.num_bytes}"
            )
        if math.isnan(self.deadline) or not self.lease_s > 0:
            raise ValueError(f"request {self.request_id!r}: deadline must be a number and lease_s > 0")

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def layers_landed(self) -> int:
        return self.landed_mask.bit_count()

    @property
    def due_at(self) -> float:
        """When the ticket expires unless something moves it on: the deadline, then the lease; never once ended."""
        if self.state in TERMINAL:
            return math.inf
        if self.state is TicketState.LANDED:
            return self.lease_until
        return self.deadline

    @property
    def transfer_s(self) -> float | None:
        """Seconds from the first byte to the last layer landing (the "KV transfer" phase), once landed."""
        if self.started_at is None or self.landed_at is None:
            return None
        return self.landed_at - self.started_at

    def endpoint(self, side: Side) -> Endpoint:
        return self.prefill if side is Side.PREFILL else self.decode

    def side_of(self, sender: Endpoint) -> Side | None:
        """Which party `sender` is; None when it is neither (another instance, or another incarnation)."""
        if sender == self.prefill:
            return Side.PREFILL
        if sender == self.decode:
            return Side.DECODE
        return None


_SOURCES: dict[type, frozenset[TicketState]] = {
    StartStreaming: frozenset({TicketState.PENDING}),
    LayerLanded: frozenset({TicketState.STREAMING}),
    Consume: frozenset({TicketState.LANDED}),
    Renew: frozenset({TicketState.LANDED}),
    Abort: LIVE,
    Expire: LIVE,
}

_TARGETS: dict[type, TicketState] = {
    StartStreaming: TicketState.STREAMING,
    Consume: TicketState.CONSUMED,
    Renew: TicketState.LANDED,
    Abort: TicketState.ABORTED,
    Expire: TicketState.EXPIRED,
}


def _all_layers(ticket: TransferTicket) -> int:
    return (1 << ticket.num_layers) - 1


def _target(ticket: TransferTicket, event: Event) -> TicketState:
    if isinstance(event, LayerLanded):
        complete = (ticket.landed_mask | (1 << event.layer)) == _all_layers(ticket)
        return TicketState.LANDED if complete else TicketState.STREAMING
    return _TARGETS[type(event)]


def transition(ticket: TransferTicket, event: Event, now: float) -> TransferTicket:
    """The only way a ticket changes state: the next ticket, or `IllegalTransition` naming from, to and event."""
    to = _target(ticket, event)
    sources = _SOURCES[type(event)]
    if ticket.state not in sources:
        legal = ", ".join(sorted(s.name for s in sources))
        raise IllegalTransition(ticket, event, to, f"{type(event).__name__} is legal only from {legal}")
    due = ticket.due_at
    if isinstance(event, Expire):
        if now < due:
            raise IllegalTransition(ticket, event, to, f"not due until {due:.3f}, now is {now:.3f}")
    elif not isinstance(event, Abort) and now >= due:
        what = "the lease ran out" if ticket.state is TicketState.LANDED else "the deadline passed"
        raise IllegalTransition(ticket, event, to, f"{what} at {due:.3f}, now is {now:.3f}")
    if isinstance(event, StartStreaming):
        return replace(ticket, state=to, started_at=now)
    if isinstance(event, LayerLanded):
        return _land_layer(ticket, event, to, now)
    if isinstance(event, Renew):
        return replace(ticket, lease_until=now + ticket.lease_s)
    return replace(ticket, state=to, ended_at=now, reason=_end_reason(ticket, event))


def _land_layer(ticket: TransferTicket, event: LayerLanded, to: TicketState, now: float) -> TransferTicket:
    if event.layer >= ticket.num_layers:
        raise IllegalTransition(ticket, event, to, f"the model has layers 0..{ticket.num_layers - 1}")
    bit = 1 << event.layer
    if ticket.landed_mask & bit:
        # Counting a layer twice would land the ticket before its KV is complete.
        raise IllegalTransition(ticket, event, to, f"layer {event.layer} already landed")
    mask = ticket.landed_mask | bit
    if to is TicketState.LANDED:
        return replace(ticket, state=to, landed_mask=mask, landed_at=now, lease_until=now + ticket.lease_s)
    return replace(ticket, landed_mask=mask)


def _end_reason(ticket: TransferTicket, event: Event) -> str:
    if isinstance(event, Abort):
        return f"aborted by {event.side.value}: {event.reason}"
    if isinstance(event, Expire):
        if ticket.state is TicketState.LANDED:
            return f"lease ran out: the decode did not consume the landed KV within {ticket.lease_s:g}s"
        return f"deadline passed with {ticket.layers_landed}/{ticket.num_layers} layers landed"
    return "consumed"
