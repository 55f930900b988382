"""Disaggregated legs: a prefill instance computes the prompt and the first token, which the client gets at
once, while the prompt's KV streams to the decode instance already chosen for the leg; the decode instance
then continues from prompt + first token.

`Handoff` is the configuration (how long a transfer may take, which prompts skip it, the receive budget, the
prefill policy and layer-wise streaming). `Disaggregated.leg(run, decode)` runs one such leg:

    pick the prefill instance (by the leg's `Placement`: its prompt blocks, for prefix-aware policies)
    -> book the prompt's KV in the decode instance's receive budget (waits; `InvalidArgument` if it can never fit)
    -> prefill (first token; the run ends here if that was its last) -> decode, streaming the rest

The budget is released exactly once: when the decode engine's first chunk shows the KV has landed there, or
else when the leg ends. KV that reached the decode side for a decode that will not finish is released there,
and a prefill left unanswered is aborted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from common.errors import DeadlineExceeded, EngineFailure, InvalidArgument
from common.roles import Role
from kv_transfer.params import RecvSpec, SendSpec, blocks_for, to_params
from router.cleanups import Cleanups
from router.delta import Delta
from router.kv_fallback import decode_kv_params, failure_reason
from router.placement import Placement, Policy
from router.placement.split import Resident, SplitView, runs_whole
from router.receive_budget import ReceiveBudget, TooLarge
from router.registry import Instance, Registry
from router.run import Run
from router.stream import Receive, Streams, awaited


@dataclass(frozen=True)
class Handoff:
    """Disaggregated serving: how long a transfer may take, which prompts skip it, the receive budget, the policy
    that places prefills (its own object: a policy may keep state, such as a round-robin turn), and which legs run
    whole on their decode instance although a prefill instance could take them (`split_policy`)."""

    deadline_s: float
    min_prompt_tokens: int
    budget: ReceiveBudget
    prefill_policy: Policy
    layerwise: bool = True
    split_policy: str = "always"  # `router.placement.split`: "always", or "sooner" (whole when that is sooner)


class Disaggregated:
    def __init__(self, handoff: Handoff, registry: Registry, streams: Streams, cleanups: Cleanups) -> None:
        self.handoff = handoff
        self.registry = registry
        self.streams = streams
        self.cleanups = cleanups

    def applies(self, run: Run) -> bool:
        """Whether the run's next leg may hand off: its context is long enough and some prefill instance is there
        (else it runs whole on its decode instance)."""
        return len(run.context) >= self.handoff.min_prompt_tokens and bool(self.registry.placeable(Role.PREFILL))

    def prefill_queue(self) -> int:
        """Prompt tokens queued on the least-queued prefill instance (0 without one)."""
        return min((p.queued_prefill_tokens for p in self.registry.placeable(Role.PREFILL)), default=0)

    def least_work(self, placement: Placement) -> tuple[int, int]:
        """`Instance.prefill_work` of the prefill instance that would reach the placement's first token soonest."""
        works = [p.prefill_work(placement) for p in self.registry.placeable(Role.PREFILL)]
        return min(works, key=sum, default=(0, placement.prompt_tokens))

    def runs_whole(self, run: Run, decode: Instance, tpot_s: float | None) -> bool:
        """Whether a leg that may hand off runs whole on `decode` instead (`router.placement.split`), keeping the
        TPOT of the requests decoding there within `tpot_s` (None: unchecked)."""
        if self.handoff.split_policy != "sooner":
            return False
        if not self.registry.placeable(Role.PREFILL):
            return True
        now = time.monotonic()
        # Every request the decode instance holds, those still before their first token (prefilling elsewhere, their
        # KV not yet there) included: their decode starts behind this prefill too.
        residents = [Resident(h.generated, h.generated + h.load().remaining_p90,
                              0.0 if h.first_token_at is None else now - h.first_token_at)
                     for h in decode.held.values() if h is not run.held]
        view = SplitView(len(run.context), self.prefill_queue(), decode.queued_prefill_tokens, residents)
        return runs_whole(view, self.streams.pace.seconds_per_token, tpot_s)

    async def leg(self, run: Run, decode: Instance) -> AsyncIterator[Delta]:
        """The run's next leg, prefilled elsewhere and decoded on `decode` (see the module docstring)."""
        budget, n = self.handoff.budget, len(run.context)
        placement = run.placement()
        prefill = self.registry.pick(self.handoff.prefill_policy, Role.PREFILL, placement)
        nbytes = await self._book(run, decode)
        deadline = time.time() + self.handoff.deadline_s
        send = SendSpec(run.leg_id, decode.info.kv_address, decode.instance_id, n, deadline, self.handoff.layerwise)
        claimed = False

        async def landed() -> None:
            nonlocal claimed
            claimed = True
            await budget.release(decode.instance_id, nbytes)

        try:
            run.clock.dispatched = run.clock.dispatched or time.monotonic()
            first = await self._prefill(run, prefill, placement, to_params(send))
            run.produce(first.token_ids)
            if first.finish_reason is not None or run.produced == run.request.sampling.max_tokens:
                run.finished = True
                outcome = run.outcome(first.finish_reason or "length", run.clock.disaggregated(time.monotonic()),
                                      prefill.instance_id)
                yield Delta(first.token_ids, run.text.step(first.token_ids), outcome)
                return
            yield Delta(first.token_ids, run.text.step(first.token_ids))
            # A prefill that could not reach the decode instance says so: the decode engine prefills now, not after
            # waiting out the transfer's deadline.
            recv = decode_kv_params(first, to_params(RecvSpec(run.leg_id, prefill.instance_id, n, deadline)))
            failure = failure_reason(first) or ""
            if failure:
                self.streams.metrics.kv_transfer_failed(failure)
            run.clock.decode_dispatched = run.clock.decode_dispatched or time.monotonic()
            run.prefill_instance = prefill.instance_id
            async for delta in self.streams.stream(run, decode, Receive(recv, landed, failure)):
                yield delta
        finally:
            if not claimed:
                await budget.release(decode.instance_id, nbytes)
            if not (claimed and run.finished):  # what reached the decode side for this transfer is not needed
                self.cleanups.send(decode.handle.release.remote([run.leg_id]))

    async def _book(self, run: Run, decode: Instance) -> int:
        """Books the KV of the run's context in `decode`'s receive budget, waiting for room until the deadline;
        returns the bytes booked, which the caller releases exactly once."""
        budget, n = self.handoff.budget, len(run.context)
        nbytes = blocks_for(n, decode.info.block_size) * decode.info.kv_block_bytes
        try:
            async with asyncio.timeout_at(run.request.deadline):
                await budget.reserve(decode.instance_id, nbytes)
        except TooLarge:  # no wait would make it fit: the request itself must change
            fits = budget.capacity // decode.info.kv_block_bytes * decode.info.block_size
            raise InvalidArgument(
                f"the prompt ({n} tokens, {nbytes} bytes of KV) is larger than a decode instance's receive buffer "
                f"({budget.capacity} bytes): at most {fits} tokens fit; shorten it or raise "
                "transfer.receive_buffer_mib"
            ) from None
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed while it waited for a decode instance") from None
        return nbytes

    async def _prefill(self, run: Run, prefill: Instance, placement: Placement, kv_params: dict[str, Any]) -> Any:
        """The prefill engine's result for the run's context: its first token, and its queue and compute times
        (recorded on the first leg). A prefill left unanswered is aborted in the engine."""
        n = self.streams.computes(prefill, placement)  # what it computes; the rest its prefix cache holds
        prefill.outstanding += 1
        prefill.queued_prefill_tokens += n
        call = prefill.channel.prefill(run.leg_id, run.context, run.request.sampling, kv_params)
        done = False
        try:
            result = await awaited(call, run.request.deadline, prefill)  # a cancelled await cancels the call
            done = True
            self.streams.pace.observe(n, result.compute)
        finally:
            prefill.outstanding -= 1
            prefill.queued_prefill_tokens -= n
            if not done:
                self.cleanups.send(prefill.handle.abort.remote(run.leg_id))
        if run.legs == 1:
            run.clock.prefill_queue, run.clock.prefill_compute = result.engine_queue, result.compute
        run.clock.tokens_arrived(time.monotonic(), len(result.token_ids))
        if not result.token_ids:
            raise EngineFailure("the prefill engine ended the request without a token")
        return result
