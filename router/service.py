"""The request lifecycle at the router.

    validate -> tokenize -> check lengths -> place -> run -> detokenize

Colocated: one instance runs the whole request. Disaggregated (`Handoff` given): a prefill instance computes the
prompt and the first token, which the client gets at once, while the prompt's KV streams to the decode instance
chosen for the request; the decode instance continues from prompt + first token. Prompts shorter than
`Handoff.min_prompt_tokens` run whole on a decode instance.

Admission (`Gate`): at most `max_outstanding` requests run at once, a bounded queue of others waits for a slot
in arrival order, and one more is refused with `Overloaded` and a retry hint. `Router.drain` takes an instance
out of placement (it keeps what it runs) and returns once it runs nothing.

Placement by predicted length: a `predictor`, when given, predicts each request's output length (p50, p90) from
its prompt once, before placement; the decode (or colocated) policy sees every instance's KV capacity and the
requests it holds (`Held`: KV now, predicted output still to come), and the request's own `Placement`. A
length-aware policy that finds no instance with room for the request (`Overloaded`) makes it wait until a request
ends somewhere, at most `hold_queue` requests at once and never past the deadline; one more is refused with the
policy's retry hint. A finished request's length is compared with its prediction (Prometheus) and fed back to the
predictor's calibration.

`Router.generate` yields `Delta`s; the last one carries the `Outcome`. It stops the request in the engines
when the consumer goes away (cancellation) or the deadline passes (`DeadlineExceeded`), and frees KV that was
sent for a decode that will not come. Transport-agnostic: the gRPC and HTTP frontends translate to and from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field, replace
from typing import Any

from common.errors import DeadlineExceeded, EngineFailure, InvalidArgument, Overloaded, ServeError
from common.roles import Role
from kv_transfer.params import RecvSpec, SendSpec, blocks_for, to_params
from router.admission import Gate
from router.channel import WorkerGone
from router.length_policies import LENGTH_AWARE
from router.metrics import RouterMetrics
from router.placement import Placement
from router.policy import Policy
from router.predictor.prediction import LengthPrediction, TextPredictor, remaining
from router.receive_budget import ReceiveBudget, TooLarge
from router.registry import Held, Instance, Registry
from router.request import Request
from router.timings import Clock, PhaseTimings
from router.tokenizer import PromptTokenizer
from router.validation import Limits, check_prompt_tokens, check_request, check_resume

log = logging.getLogger(__name__)

MAX_RESUMES = 2  # lost workers a request survives


@dataclass(frozen=True)
class Handoff:
    """Disaggregated serving: how long a transfer may take, which prompts skip it, the receive budget, and the
    policy that places prefills (its own object: a policy may keep state, such as a round-robin turn)."""

    deadline_s: float
    min_prompt_tokens: int
    budget: ReceiveBudget
    prefill_policy: Policy
    layerwise: bool = True


@dataclass(frozen=True, slots=True)
class Outcome:
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    timings: PhaseTimings
    prefill_instance: str  # the instance that computed the prompt
    decode_instance: str  # the instance that produced the later tokens (the same one when run whole)


@dataclass(frozen=True, slots=True)
class Delta:
    token_ids: list[int]
    text: str
    outcome: Outcome | None = None


def new_request_id() -> str:
    return uuid.uuid4().hex


class Router:
    def __init__(
        self,
        registry: Registry,
        policy: Policy,
        tokenizer: PromptTokenizer,
        limits: Limits,
        metrics: RouterMetrics,
        handoff: Handoff | None = None,
        admission: Gate[asyncio.Future[None]] | None = None,
        predictor: TextPredictor | None = None,
        hold_queue: int = 0,
    ) -> None:
        self.metrics = metrics
        self.registry = registry
        self.policy = policy
        self.predictor = predictor
        self.hold_queue = hold_queue
        self._detailed = policy.name in LENGTH_AWARE  # snapshots carry KV capacity and held requests
        self._holding = 0  # requests waiting for KV room on a decode instance
        self._room = asyncio.Event()  # set (and replaced) whenever a request leaves an instance
        self.tokenizer = tokenizer
        self.limits = limits
        self.handoff = handoff
        self.admission: Gate[asyncio.Future[None]] = admission if admission is not None else Gate(0, 0)
        self._cleanups: set[Any] = set()  # aborts and releases sent to workers and not yet done

    def _cleanup(self, ref: Any) -> None:
        """Tracks a fire-and-forget call to a worker until it is done, so `settle` can wait for it."""
        future = ref.future()
        self._cleanups.add(future)
        future.add_done_callback(self._cleanups.discard)

    async def settle(self) -> None:
        """Waits until every abort and release sent to the workers so far has run (errors ignored)."""
        pending = [asyncio.wrap_future(f) for f in list(self._cleanups)]
        await asyncio.gather(*pending, return_exceptions=True)

    @property
    def mode(self) -> str:
        return "disaggregated" if self.handoff is not None else Role.COLOCATED

    async def generate(self, request: Request) -> AsyncIterator[Delta]:
        """Streams the request's deltas; every request that ends is counted once in the metrics, by outcome."""
        ended = False
        last_tokens = 0.0  # when the previous message of tokens went out
        try:
            async for delta in self._generate(request):
                if delta.token_ids:
                    now = time.monotonic()
                    if last_tokens:
                        self.metrics.itl.observe(now - last_tokens)
                    last_tokens = now
                if delta.outcome is not None:
                    o = delta.outcome
                    self.metrics.finished(o.finish_reason, o.prompt_tokens, o.completion_tokens, o.timings)
                    ended = True
                yield delta
        except ServeError as e:
            self.metrics.ended_early(e.status)
            ended = True
            raise
        finally:
            if not ended:
                self.metrics.ended_early("cancelled")

    async def _generate(self, request: Request) -> AsyncIterator[Delta]:
        clock = Clock(arrival=request.arrival or time.monotonic())
        check_request(request, self.limits)
        prompt_ids = self.tokenizer.encode(request)
        check_prompt_tokens(prompt_ids, self.limits)
        check_resume(prompt_ids, request, self.limits)
        async with self._admitted(request):
            run = _Run(request, prompt_ids, clock, self.tokenizer.text_stream())
            run.prediction = await self._predict(request, prompt_ids)
            async for delta in self._resuming(run):
                if delta.outcome is not None and run.prediction is not None:
                    self._learn(run.prediction, delta.outcome.completion_tokens)
                yield delta

    async def _predict(self, request: Request, prompt_ids: list[int]) -> LengthPrediction | None:
        """The predictor's quantiles of the request's output length (off the event loop); None without one."""
        if self.predictor is None:
            return None
        text = _prompt_text(request)
        if text is None:
            text = self.tokenizer.decode(prompt_ids)
        try:
            return await asyncio.to_thread(self.predictor.predict_text, text, len(prompt_ids),
                                           request.sampling.max_tokens)
        except Exception:  # placement falls back to max_tokens; a predictor fault never fails a request
            log.exception("output-length prediction failed for request %s", request.request_id)
            return None

    def _learn(self, prediction: LengthPrediction, generated: int) -> None:
        self.metrics.predicted(prediction.p50, prediction.p90, generated)
        assert self.predictor is not None
        self.predictor.observe(prediction, generated)

    @contextlib.asynccontextmanager
    async def _admitted(self, request: Request) -> AsyncIterator[None]:
        """Holds one of the gate's slots while the request runs; waits in its queue (until the deadline) first
        when none is free."""
        gate = self.admission
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not gate.enter(waiter):  # Overloaded when the queue is full
            try:
                async with asyncio.timeout_at(request.deadline):
                    await waiter
            except BaseException as e:
                if not gate.withdraw(waiter):  # the slot was handed over as the wait ended: pass it on
                    self._pass_on(gate.leave())
                if isinstance(e, TimeoutError):
                    raise DeadlineExceeded("the request's deadline passed while it waited for admission") from None
                raise
        try:
            yield
        finally:
            self._pass_on(gate.leave())

    @staticmethod
    def _pass_on(successor: asyncio.Future[None] | None) -> None:
        # A waiter cancelled a moment ago is done already; it sees the slot was handed over and passes it on.
        if successor is not None and not successor.done():
            successor.set_result(None)

    async def _resuming(self, run: _Run) -> AsyncIterator[Delta]:
        """The request's legs: a leg that loses its worker is followed by one on another instance."""
        request = run.request
        while True:
            try:
                async for delta in self._leg(run):
                    yield delta
                return
            except WorkerLost as lost:
                # The worker died under the request: it leaves the pool, and the request resumes elsewhere from
                # the prompt plus every token the client already has (greedy output is unchanged by the move).
                lost.instance.healthy = False
                if run.legs > MAX_RESUMES:
                    raise EngineFailure(f"{run.legs} workers failed under the request: {lost}") from None
                self.metrics.resumed.inc()
                log.warning("request %s resumes after %s", request.request_id, lost)

    async def _leg(self, run: _Run) -> AsyncIterator[Delta]:
        """The request's next leg: all of it, or what is left of it after a lost worker."""
        run.legs += 1
        run.prefill_instance, run.on_first_chunk = "", None
        h = self.handoff
        disaggregated = h is not None and len(run.context) >= h.min_prompt_tokens and self._any_eligible(Role.PREFILL)
        # Colocated mode, short prompts, and every prefill instance lost: the request runs whole on one instance.
        instance = await self._place(Role.DECODE if h is not None else Role.COLOCATED, run)
        try:
            if disaggregated:
                assert h is not None
                stream = self._disaggregated(run, h, instance)
            else:
                run.clock.dispatched = run.clock.dispatched or time.monotonic()
                stream = self._stream(run, instance, run.context, run.rest(), None)
            async for delta in stream:
                yield delta
        finally:
            self._release(instance, run)

    def _any_eligible(self, role: str) -> bool:
        return any(s.healthy and not s.draining for s in self.registry.snapshots(role))

    async def drain(self, instance_id: str, timeout: float) -> None:
        """Places no new request on the instance; returns once the requests it runs have ended (TimeoutError
        after `timeout` seconds, the instance still draining). Placement skips it until `undrain`."""
        instance = self.registry.get(instance_id)
        instance.draining = True
        async with asyncio.timeout(timeout):
            while instance.outstanding > 0:
                await asyncio.sleep(0.05)  # requests end on other tasks; their count is all there is to watch

    def undrain(self, instance_id: str) -> None:
        self.registry.get(instance_id).draining = False

    def _placement(self, run: _Run) -> Placement:
        """What the policy knows of the rest of the request: its context now and the output still to come."""
        max_tokens = run.request.sampling.max_tokens
        prediction = None if run.prediction is None else remaining(run.prediction, run.produced, max_tokens)
        return Placement(len(run.context), max_tokens - run.produced, prediction)

    async def _place(self, role: str, run: _Run) -> Instance:
        """The decode (or colocated) instance for the run's next leg, which holds the request from now until
        `_release`. With no room anywhere for its projected load, the request waits for a request to end (see
        the module docstring)."""
        placement = self._placement(run)
        while True:
            try:
                instance = self.registry.get(self.policy.pick(self.registry.snapshots(role, self._detailed),
                                                              placement))
                break
            except Overloaded:
                if self._holding >= self.hold_queue or not self._may_fit(role, placement):
                    raise  # the queue is full, or no request that ends can make room for it
                await self._wait_for_room(run.request)
        run.held = instance.held[run.leg_id] = Held(placement.prompt_tokens, placement.max_tokens, placement.length)
        return instance

    def _may_fit(self, role: str, placement: Placement) -> bool:
        """Whether the request could fit once some held requests end: it fits an empty instance of the largest
        capacity (its projected peak there is its prompt plus its predicted output), and some request is held."""
        instances = [i for i in self.registry.all() if i.role == role and i.healthy and not i.draining]
        need = placement.prompt_tokens + placement.length.p90
        return any(i.held for i in instances) and need <= max((i.kv_capacity_tokens for i in instances), default=0)

    async def _wait_for_room(self, request: Request) -> None:
        self._holding += 1
        self.metrics.held.inc()
        try:
            async with asyncio.timeout_at(request.deadline):
                await self._room.wait()
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed while it waited for KV room on a decode "
                                   "instance") from None
        finally:
            self._holding -= 1
            self.metrics.held.dec()

    def _release(self, instance: Instance, run: _Run) -> None:
        instance.held.pop(run.leg_id, None)
        run.held = None
        room, self._room = self._room, asyncio.Event()
        room.set()

    def _pick_prefill(self) -> Instance:
        assert self.handoff is not None
        policy = self.handoff.prefill_policy
        return self.registry.get(policy.pick(self.registry.snapshots(Role.PREFILL, policy.name in LENGTH_AWARE)))

    async def _disaggregated(self, run: _Run, handoff: Handoff, decode: Instance) -> AsyncIterator[Delta]:
        request, clock, context = run.request, run.clock, run.context
        n = len(context)
        prefill = self._pick_prefill()
        nbytes = blocks_for(n, decode.info.block_size) * decode.info.kv_block_bytes
        try:
            async with asyncio.timeout_at(request.deadline):
                await handoff.budget.reserve(decode.instance_id, nbytes)
        except TooLarge:  # no wait would make it fit: the request itself must change
            fits = handoff.budget.capacity // decode.info.kv_block_bytes * decode.info.block_size
            raise InvalidArgument(
                f"the prompt ({n} tokens, {nbytes} bytes of KV) is larger than a decode instance's receive buffer "
                f"({handoff.budget.capacity} bytes): at most {fits} tokens fit; shorten it or raise "
                "transfer.receive_buffer_mib"
            ) from None
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed while it waited for a decode instance") from None
        deadline = time.time() + handoff.deadline_s
        send = SendSpec(run.leg_id, decode.info.kv_address, decode.instance_id, n, deadline, handoff.layerwise)
        claimed = False
        try:
            clock.dispatched = clock.dispatched or time.monotonic()
            first = await self._prefill(run, prefill, to_params(send))
            run.produce(first.token_ids)
            if first.finish_reason is not None or run.produced == request.sampling.max_tokens:
                run.finished = True
                reason = first.finish_reason or "length"
                timings = clock.disaggregated(time.monotonic())
                outcome = Outcome(reason, len(run.prompt_ids), run.produced, timings, prefill.instance_id,
                                  prefill.instance_id)
                yield Delta(first.token_ids, run.text.step(first.token_ids), outcome)
                return
            yield Delta(first.token_ids, run.text.step(first.token_ids))
            recv = to_params(RecvSpec(run.leg_id, prefill.instance_id, n, deadline))
            clock.decode_dispatched = clock.decode_dispatched or time.monotonic()

            async def landed() -> None:
                nonlocal claimed
                claimed = True
                await handoff.budget.release(decode.instance_id, nbytes)

            run.on_first_chunk = landed
            run.prefill_instance = prefill.instance_id
            async for delta in self._stream(run, decode, context + first.token_ids, run.rest(), recv):
                yield delta
        finally:
            if not claimed:
                await handoff.budget.release(decode.instance_id, nbytes)
            if not (claimed and run.finished):  # what reached the decode side for this transfer is not needed
                self._cleanup(decode.handle.release.remote([run.leg_id]))

    async def _prefill(self, run: _Run, prefill: Instance, kv_params: dict[str, Any]) -> Any:
        request = run.request
        prefill.outstanding += 1
        prefill.queued_prefill_tokens += len(run.context)
        call = prefill.channel.prefill(run.leg_id, run.context, request.sampling, kv_params)
        done = False
        try:
            result = await self._await(call, request, prefill)  # a cancelled await cancels the call in the worker
            done = True
        finally:
            prefill.outstanding -= 1
            prefill.queued_prefill_tokens -= len(run.context)
            if not done:
                self._cleanup(prefill.handle.abort.remote(run.leg_id))
        if run.legs == 1:
            run.clock.prefill_queue, run.clock.prefill_compute = result.engine_queue, result.compute
        run.clock.tokens_arrived(time.monotonic(), len(result.token_ids))
        if not result.token_ids:
            raise EngineFailure("the prefill engine ended the request without a token")
        return result

    async def _stream(
        self, run: _Run, instance: Instance, prompt_ids: list[int], sampling: Any, kv_params: dict[str, Any] | None
    ) -> AsyncIterator[Delta]:
        request, clock = run.request, run.clock
        instance.outstanding += 1
        self.metrics.running.inc()
        stream = instance.channel.generate(run.leg_id, prompt_ids, sampling, kv_params)
        handed_off = kv_params is not None
        first = True
        try:
            while not run.finished:
                chunk = await self._await(stream.next(), request, instance)
                clock.tokens_arrived(time.monotonic(), len(chunk.token_ids))
                if first:
                    first = False
                    if handed_off:
                        clock.decode_compute = clock.decode_compute or chunk.prefill_compute
                        if run.on_first_chunk is not None:
                            await run.on_first_chunk()
                    elif run.legs == 1:
                        clock.prefill_compute = chunk.prefill_compute
                run.produce(chunk.token_ids)
                outcome = None
                if chunk.finish_reason is not None:
                    if chunk.finish_reason not in ("stop", "length"):
                        raise EngineFailure(f"the engine ended the request with {chunk.finish_reason!r}")
                    run.finished = True
                    now = time.monotonic()
                    if handed_off:
                        clock.kv_wait = _kv_wait(chunk.transfer)
                        if chunk.transfer:
                            self.metrics.transferred(int(chunk.transfer["bytes"]), bool(chunk.transfer["ok"]))
                    timings = clock.disaggregated(now) if handed_off else clock.colocated(now)
                    outcome = Outcome(chunk.finish_reason, len(run.prompt_ids), run.produced, timings,
                                      run.prefill_instance or instance.instance_id, instance.instance_id)
                yield Delta(chunk.token_ids, run.text.step(chunk.token_ids), outcome)
        finally:
            instance.outstanding -= 1
            self.metrics.running.dec()
            if not run.finished:
                # The client went away, the deadline passed or the worker failed: stop the engine's work.
                stream.cancel()
                self._cleanup(instance.handle.abort.remote(run.leg_id))

    @staticmethod
    async def _await(step: Awaitable[Any], request: Request, instance: Instance) -> Any:
        """`step`'s result; a passed deadline becomes `DeadlineExceeded`, a worker gone `WorkerLost`."""
        try:
            # asyncio.timeout_at costs no task per token, unlike wait_for; None means no deadline.
            async with asyncio.timeout_at(request.deadline):
                return await step
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed before it finished") from None
        except WorkerGone as e:
            raise WorkerLost(instance, str(e)) from None


class WorkerLost(Exception):
    """The worker running a leg of a request is gone; the router resumes the request elsewhere."""

    def __init__(self, instance: Instance, reason: str) -> None:
        super().__init__(f"{instance.instance_id}: {reason}")
        self.instance = instance


@dataclass(slots=True)
class _Run:
    """One request in flight at the router. A leg is one attempt at the rest of it (a second leg after a lost
    worker starts from the prompt plus every token generated so far)."""

    request: Request
    prompt_ids: list[int]
    clock: Clock
    text: Any  # the detokenizer's stream
    produced: int = 0
    generated: list[int] = field(default_factory=list)  # every token the client has been sent
    finished: bool = False
    legs: int = 0
    on_first_chunk: Any = None  # awaited when the first chunk from the engine arrives
    prefill_instance: str = ""  # set once a prefill instance computed the prompt
    prediction: LengthPrediction | None = None  # of the whole output (the resumed tokens included); None: none
    held: Held | None = None  # the request on its current leg's decode (or colocated) instance

    def __post_init__(self) -> None:
        # A request the client resumes starts as a run that lost its worker after sending those tokens: its first
        # leg continues from the prompt plus them. The detokenizer reads them too (their text went out before), so
        # a character split across the boundary comes out whole.
        if self.request.resume_token_ids:
            self.generated = list(self.request.resume_token_ids)
            self.produced = len(self.generated)
            self.text.step(self.generated)

    @property
    def context(self) -> list[int]:
        """What the next leg starts from."""
        return self.prompt_ids + self.generated

    @property
    def leg_id(self) -> str:
        """The engines' request id (and the transfer id) of the current leg: unique per leg."""
        rid = self.request.request_id
        return rid if self.legs <= 1 else f"{rid}.{self.legs}"

    def produce(self, token_ids: list[int]) -> None:
        self.produced += len(token_ids)
        self.generated += token_ids
        if self.held is not None:
            self.held.generated += len(token_ids)

    def rest(self) -> Any:
        return replace(self.request.sampling, max_tokens=self.request.sampling.max_tokens - self.produced)


def _prompt_text(request: Request) -> str | None:
    """The text a length predictor reads: the prompt, or a chat's last user message; None for token ids."""
    if request.prompt is not None:
        return request.prompt
    if request.chat is not None:
        return next((m.content for m in reversed(request.chat) if m.role == "user"), request.chat[-1].content)
    return None


def _kv_wait(record: dict[str, Any] | None) -> float:
    """Seconds the decode engine waited for KV that had not landed when it was ready for it."""
    if not record:
        return 0.0
    return max(0.0, float(record["landed"]) - float(record["posted"]))
