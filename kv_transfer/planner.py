"""`TransferPlanner`: the scheduler half of our KV connector, as plain bookkeeping over request ids.

It answers vLLM's scheduler hooks and decides, step by step, which requests' KV the worker half loads or sends:

    decode (RecvSpec):  matched_tokens -> (num_tokens, async) once; allocated -> a `LoadJob` into the blocks the
                        scheduler allocated; the worker reports the load done (or failed) later.
    prefill (SendSpec): plan -> a `SaveJob` in the step that computes the prompt's last token (the KV of every
                        earlier chunk is final by then); finished -> hold the blocks until the worker reports the
                        send done, so no block is reused while its bytes are on the wire.

Each request is loaded at most once and saved at most once. A malformed spec is logged by the caller and treated
as no spec: a bad request must never take the engine down.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kv_transfer.params import RecvSpec, SendSpec, Spec, blocks_for


@dataclass(frozen=True, slots=True)
class LoadJob:
    req_id: str
    spec: RecvSpec
    block_ids: tuple[int, ...]  # where the KV of the spec's tokens goes, in token order


@dataclass(frozen=True, slots=True)
class SaveJob:
    req_id: str
    spec: SendSpec
    block_ids: tuple[int, ...]  # where the prompt's KV is, in token order


@dataclass(slots=True)
class StepPlan:
    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Scheduled:
    """One request in this step's schedule: tokens computed before the step and tokens it computes."""

    req_id: str
    num_computed: int
    num_scheduled: int


class TransferPlanner:
    __slots__ = ("_block_size", "_loading", "_loads", "_saving", "_senders")

    def __init__(self, block_size: int) -> None:
        self._block_size = block_size
        self._senders: dict[str, SendSpec] = {}
        self._saving: set[str] = set()
        self._loading: set[str] = set()
        self._loads: list[LoadJob] = []

    def matched_tokens(self, req_id: str, spec: Spec | None, num_computed: int) -> tuple[int, bool]:
        """vLLM's get_num_new_matched_tokens: tokens the worker will load asynchronously."""
        if not isinstance(spec, RecvSpec) or req_id in self._loading:
            return 0, False
        n = spec.num_tokens - num_computed
        return (n, True) if n > 0 else (0, False)

    def allocated(
        self, req_id: str, spec: Spec | None, block_ids: Sequence[int], num_external: int
    ) -> None:
        """vLLM's update_state_after_alloc: blocks exist for the request."""
        if isinstance(spec, SendSpec):
            self._senders[req_id] = spec
        elif isinstance(spec, RecvSpec) and num_external > 0 and req_id not in self._loading:
            needed = blocks_for(spec.num_tokens, self._block_size)
            if len(block_ids) < needed:
                raise ValueError(f"{req_id}: {len(block_ids)} blocks allocated for {needed} blocks of KV")
            self._loading.add(req_id)
            self._loads.append(LoadJob(req_id, spec, tuple(block_ids[:needed])))

    def plan(self, step: Sequence[Scheduled], block_ids_of: Callable[[str], Sequence[int]]) -> StepPlan:
        """vLLM's build_connector_meta: the loads allocated since the last step, the saves this step completes."""
        plan = StepPlan(loads=self._loads)
        self._loads = []
        for s in step:
            spec = self._senders.get(s.req_id)
            if spec is None or s.req_id in self._saving or s.num_computed + s.num_scheduled < spec.num_tokens:
                continue
            blocks = block_ids_of(s.req_id)[: blocks_for(spec.num_tokens, self._block_size)]
            plan.saves.append(SaveJob(s.req_id, spec, tuple(blocks)))
            self._saving.add(s.req_id)
        return plan

    def finished(self, req_id: str) -> bool:
        """vLLM's request_finished: True to keep the request's blocks until the worker reports its send done."""
        self._loading.discard(req_id)
        self._senders.pop(req_id, None)
        if req_id in self._saving:
            self._saving.discard(req_id)
            return True
        return False

    @property
    def tracked(self) -> int:
        """Requests the planner still remembers (zero once every request has finished)."""
        return len(self._senders) + len(self._saving) + len(self._loading) + len(self._loads)
