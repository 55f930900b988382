"""Who is at each end of a KV link: an `Endpoint` is one incarnation of a worker (its instance id and the epoch it
was started with). `Epochs` is the fence: it keeps the newest epoch seen per instance and refuses a message from an
older incarnation with `StaleEpoch`, so a restarted worker's dead predecessor can never deliver into it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One incarnation of a worker: its instance id and the epoch it was started with."""

    instance_id: str
    epoch: int

    def __post_init__(self) -> None:
        if not self.instance_id:
            raise ValueError("an endpoint needs a non-empty instance_id")
        if self.epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {self.epoch} for instance {self.instance_id!r}")

    def __str__(self) -> str:
        return f"{self.instance_id}@{self.epoch}"


class TransferError(Exception):
    """A message the protocol refuses. The refused message changes nothing; the caller decides what to tell whom."""


class StaleEpoch(TransferError):
    def __init__(self, sender: Endpoint, current: int) -> None:
        super().__init__(
            f"instance {sender.instance_id!r}: epoch {sender.epoch} is stale, current is {current} "
            "(the message comes from an incarnation that has since restarted)"
        )
        self.sender = sender
        self.current = current


class Epochs:
    """The current epoch of every instance seen: the fence that turns away a dead incarnation's messages."""

    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def current(self, instance_id: str) -> int | None:
        return self._current.get(instance_id)

    def admit(self, sender: Endpoint) -> bool:
        """Accept `sender`'s epoch or raise `StaleEpoch`.

        True when it supersedes a known older epoch: the instance restarted, so every older incarnation is dead
        and whatever it held must be given up by the caller.
        """
        current = self._current.get(sender.instance_id)
        if current is not None and sender.epoch < current:
            raise StaleEpoch(sender, current)
        self._current[sender.instance_id] = sender.epoch
        return current is not None and sender.epoch > current
