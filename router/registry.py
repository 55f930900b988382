"""The instance registry: the router's live view of its workers (handles, channels, outstanding requests, and
the requests each holds and the prompt tokens each has still to prefill, for length-aware placement).

Policies never see this object, only the `InstanceSnapshot`s it hands out. A `Held` request is one a decode (or
colocated) instance holds KV for from the moment it is placed there until its leg ends: its KV tokens now and
the output still predicted to come, as `RequestLoad`s in the snapshot (`detailed`), beside the instance's KV
capacity in tokens.

Each instance whose engine caches prefixes also keeps `prefixes`, the prompt blocks the router placed there
(`TrackedPrefixes`, as many as the engine has KV blocks): `computes` records a prompt the instance computes, and
detailed snapshots carry the set for prefix-aware placement. A restarted engine starts with an empty cache, and so
does its tracked set (`restarted`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.results import EngineInfo, EngineStats
from router.placement import InstanceSnapshot, Placement, Policy, RequestLoad, needs_detail
from router.placement.prefix import uncached_tokens
from router.placement.tracked import PrefixHit, TrackedPrefixes
from router.predictor.prediction import LengthPrediction, remaining


@dataclass(slots=True)
class Held:
    """A request on an instance: `context_tokens` of KV when its leg began, `generated` since (the first of them
    at `first_token_at`), at most `max_tokens` in the leg, and the leg's predicted output."""

    context_tokens: int
    max_tokens: int
    prediction: LengthPrediction
    generated: int = 0
    first_token_at: float | None = None  # time.monotonic() of the leg's first token; None: none yet

    def load(self, pad: int = 0) -> RequestLoad:
        """Its load now, counting `pad` more KV tokens than it has (the unused end of its last block)."""
        left = remaining(self.prediction, self.generated, self.max_tokens)
        return RequestLoad(self.context_tokens + self.generated + pad, left.p50, left.p90,
                           self.max_tokens - self.generated)


@dataclass(slots=True)
class Instance:
    instance_id: str
    role: str
    handle: Any  # the worker's Ray actor handle: lifecycle calls (stats, abort, release, shutdown)
    info: EngineInfo
    channel: Any  # the worker's request channel (`worker.channel_server.WorkerChannel`): prompts in, tokens out
    outstanding: int = 0
    healthy: bool = True
    draining: bool = False  # out of placement; it finishes the requests it has
    stats: EngineStats | None = None  # the engine's stats at its last heartbeat; None: none yet
    held: dict[str, Held] = field(default_factory=dict)  # by leg id: requests placed here whose leg has not ended
    queued_prefill_tokens: int = 0  # uncached prompt tokens of the prompts sent here, until their first token
    prefixes: TrackedPrefixes = field(init=False)

    def __post_init__(self) -> None:
        self.prefixes = _tracked(self.info)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.info.num_blocks * self.info.block_size

    def computes(self, placement: Placement) -> PrefixHit | None:
        """The placement's prompt is computed here: what the engine's prefix cache holds of it (None: the engine
        caches no prefixes), and its blocks held from now on."""
        if not self.info.prefix_caching:
            return None
        return self.prefixes.route(placement)

    def prefill_work(self, placement: Placement) -> tuple[int, int]:
        """(prompt tokens queued here, tokens of the placement's prompt this instance would compute: those its
        prefix cache holds left out)."""
        return self.queued_prefill_tokens, uncached_tokens(placement, self.prefixes.held)

    def restarted(self, info: EngineInfo) -> None:
        """The worker started again with a fresh engine, described by `info`: nothing of its cache is left."""
        self.info = info
        self.prefixes = _tracked(info)

    def snapshot(self, detailed: bool = False) -> InstanceSnapshot:
        """What a policy sees; `detailed` adds the KV capacity and the held requests' loads."""
        if not detailed:
            return InstanceSnapshot(self.instance_id, self.role, self.outstanding, self.healthy,
                                    draining=self.draining)
        # The engine hands KV out in whole blocks: n requests of x_i tokens take sum(ceil(x_i / B)) blocks, which
        # fit the capacity C (a multiple of B) exactly when sum(x_i) + n * (B - 1) <= C + B - 1. So each held
        # request counts B - 1 tokens more than it has, and the one being placed is counted as it is.
        pad = self.info.block_size - 1
        return InstanceSnapshot(self.instance_id, self.role, self.outstanding, self.healthy, self.kv_capacity_tokens,
                                tuple(h.load(pad) for h in self.held.values()), self.queued_prefill_tokens,
                                self.prefixes.held, self.draining)


def _tracked(info: EngineInfo) -> TrackedPrefixes:
    return TrackedPrefixes(info.num_blocks if info.prefix_caching else 0)


class Registry:
    def __init__(self, instances: list[Instance]) -> None:
        if not instances:
            raise ValueError("a registry needs at least one instance")
        self._by_id = {i.instance_id: i for i in instances}

    def snapshots(self, role: str, detailed: bool = False) -> list[InstanceSnapshot]:
        return [i.snapshot(detailed) for i in self._by_id.values() if i.role == role]

    @property
    def block_size(self) -> int:
        """Tokens per KV block: the engines share one configuration, so one size (that of the first instance)."""
        return next(iter(self._by_id.values())).info.block_size

    def get(self, instance_id: str) -> Instance:
        return self._by_id[instance_id]

    def pick(self, policy: Policy, role: str, placement: Placement | None = None) -> Instance:
        """The instance `policy` picks among those of `role`, from snapshots as detailed as the policy needs; the
        policy's `NoInstance` or `Overloaded` passes through."""
        return self.get(policy.pick(self.snapshots(role, needs_detail(policy)), placement))

    def placeable(self, role: str) -> list[Instance]:
        """The instances of `role` a policy may pick: healthy and not draining."""
        return [i for i in self._by_id.values() if i.role == role and i.healthy and not i.draining]

    def all(self) -> list[Instance]:
        return list(self._by_id.values())

    def remove(self, instance_id: str) -> Instance:
        """Takes the instance out of the registry (the router and the supervisor forget it)."""
        if len(self._by_id) == 1:
            raise ValueError(f"{instance_id} is the last instance; a registry needs at least one")
        return self._by_id.pop(instance_id)

    def count(self, role: str) -> int:
        return sum(1 for i in self._by_id.values() if i.role == role)
