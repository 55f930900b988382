"""Incremental scoring (profiles, bounded exact scoring) picks what the straightforward full scoring picks."""

import random
from typing import Any

import pytest

from common.errors import NoInstance, Overloaded
from pdserve_tools.sim.cost import CostModel
from pdserve_tools.sim.decode import DecodeState, Seq
from pdserve_tools.sim.workload import WorkloadConfig, generate
from router.placement import InstanceSnapshot, Placement, RequestLoad
from router.placement.kv import (
    KvProfile,
    LeastKv,
    MaxTokensWeighted,
    ProjectedKv,
    incoming_load,
    pick_lowest,
    profile_of,
    projected_peak,
)
from router.placement.prefix import PrefixAffinity, cached_tokens
from router.predictor.prediction import LengthPrediction


class FullProjectedKv:
    """The reference: every instance's whole running list scored on every pick."""

    def __init__(self) -> None:
        self.turn = 0

    def pick(self, snapshots: list[InstanceSnapshot], placement: Placement) -> str:
        candidates = [s for s in snapshots if s.healthy and not s.draining]
        if not candidates:
            raise NoInstance("none")
        new = incoming_load(placement)
        peaks = {s.instance_id: projected_peak(s.running, new) for s in candidates}
        fitting = [s for s in candidates if s.kv_capacity_tokens <= 0 or peaks[s.instance_id] <= s.kv_capacity_tokens]
        if not fitting:
            raise Overloaded("full", 1.0)

        def score(s: InstanceSnapshot) -> tuple[float, ...]:
            peak = peaks[s.instance_id]
            headroom = s.kv_capacity_tokens - peak if s.kv_capacity_tokens > 0 else -peak
            return (-headroom, sum(r.remaining_p50 for r in s.running))

        chosen = pick_lowest(fitting, score, self.turn)
        self.turn += 1
        return chosen


def random_load(rng: random.Random) -> RequestLoad:
    p50 = rng.choice([0, 1, 2, 5, 10, 40, 300])  # 0: nothing left to generate
    p90 = p50 + rng.choice([0, 0, 3, 50, 400])
    return RequestLoad(rng.randint(1, 900), p50, p90, p90 + rng.randint(0, 100))


def random_snapshot(rng: random.Random, i: int, with_profile: bool) -> InstanceSnapshot:
    running = tuple(random_load(rng) for _ in range(rng.choice([0, 0, 1, 2, 5, 12])))
    capacity = rng.choice([0, 2_000, 4_000, 4_000, 8_000])
    return InstanceSnapshot(f"i{i}", "decode", len(running), rng.random() > 0.1, capacity, running,
                            profile=profile_of(running) if with_profile else None)


def random_placement(rng: random.Random) -> Placement:
    p50 = rng.choice([1, 10, 60, 700])
    return Placement(rng.randint(0, 1_500), 2_048, LengthPrediction(p50, p50 * rng.choice([1, 2, 3])))


def outcome(policy: Any, snaps: list[InstanceSnapshot], placement: Placement) -> str | type[Exception]:
    """The instance `policy` picks, or the kind of refusal it raises."""
    try:
        return str(policy.pick(snaps, placement))
    except (Overloaded, NoInstance) as e:
        return type(e)


def test_profile_peak_with_a_new_request_equals_the_full_pass():
    rng = random.Random(7)
    for _ in range(2_000):
        running = [random_load(rng) for _ in range(rng.randint(0, 15))]
        new = random_load(rng)
        p = profile_of(running)
        assert p.peak == projected_peak(running)
        assert p.peak_with(new.tokens, new.remaining_p90) == projected_peak(running, new)
        assert p.kv_tokens == sum(r.tokens for r in running) and p.requests == len(running)
        assert p.next_step == sum(r.tokens + 1 for r in running if r.remaining_p90 >= 1)


def test_empty_profile():
    p = profile_of([])
    assert (p.peak, p.kv_tokens, p.reserved_tokens, p.remaining_p50) == (0, 0, 0, 0)
    assert p.peak_with(100, 20) == 120


@pytest.mark.parametrize("with_profile", [False, True])
def test_projected_kv_picks_what_full_scoring_picks_on_random_snapshots(with_profile):
    rng = random.Random(11)
    fast, full = ProjectedKv(), FullProjectedKv()
    outcomes = set()
    for _ in range(1_500):
        snaps = [random_snapshot(rng, i, with_profile) for i in range(rng.randint(1, 9))]
        placement = random_placement(rng)
        want = outcome(full, snaps, placement)
        assert outcome(fast, snaps, placement) == want
        outcomes.add(want if isinstance(want, type) else str)
    assert outcomes == {str, Overloaded, NoInstance}  # the random cases cover picks, full pools and empty ones


def test_ties_among_many_equal_instances_take_turns_with_profiles():
    empty = profile_of([])
    snaps = [InstanceSnapshot(f"i{i}", "decode", 0, True, 1_000, profile=empty) for i in range(4)]
    policy = ProjectedKv()
    assert [policy.pick(snaps, Placement(10, 10)) for _ in range(6)] == ["i0", "i1", "i2", "i3", "i0", "i1"]


def test_baselines_read_the_profile_when_there_is_one():
    rng = random.Random(3)
    for _ in range(300):
        plain = [random_snapshot(rng, i, False) for i in range(6)]
        if not any(s.healthy for s in plain):
            continue
        summed = [InstanceSnapshot(s.instance_id, s.role, s.outstanding, s.healthy, s.kv_capacity_tokens,
                                   profile=profile_of(s.running)) for s in plain]
        for make in (LeastKv, MaxTokensWeighted):
            assert make().pick(plain) == make().pick(summed)


def full_prefix_pick(snaps: list[InstanceSnapshot], placement: Placement, turn: int) -> str:
    def score(s: InstanceSnapshot) -> tuple[float, ...]:
        work = s.queued_prefill_tokens + placement.prompt_tokens - cached_tokens(placement, s.cached_prefixes)
        return (float(work), float(s.outstanding))

    return pick_lowest([s for s in snaps if s.healthy], score, turn)


def test_prefix_affinity_picks_what_full_scoring_picks():
    rng = random.Random(5)
    chains = [tuple(rng.getrandbits(40) for _ in range(6)) for _ in range(3)]
    policy = PrefixAffinity()
    for turn in range(1_000):
        snaps = []
        for i in range(rng.randint(1, 8)):
            cached = frozenset(h for chain in chains for h in chain[: rng.randint(0, 6)] if rng.random() < 0.9)
            snaps.append(InstanceSnapshot(f"p{i}", "prefill", rng.choice([0, 0, 1, 3]),
                                          queued_prefill_tokens=rng.choice([0, 0, 16, 40, 200]),
                                          cached_prefixes=cached))
        placement = Placement(rng.randint(0, 120), 10, prefix_hashes=rng.choice(chains), block_tokens=16)
        assert policy.pick(snaps, placement) == full_prefix_pick(snaps, placement, turn)


def test_decode_state_profile_matches_its_request_loads_as_it_runs():
    cost = CostModel(kv_capacity_tokens=6_000)
    state = DecodeState("d0", cost.kv_capacity_tokens)
    requests = generate(WorkloadConfig(requests=120, max_prompt_tokens=1_500, seed=4))
    now, checked = 0.0, 0
    for n, req in enumerate(requests):
        seq = Seq(req)
        state.place(seq)
        seq.set_generated(1)  # prefill done
        if req.output_tokens > 1:
            state.waiting.append(seq)
        else:
            state.drop(seq)
        if n % 3 == 0 and not state.busy:
            end = state.start(now, cost)
            if end is not None:
                now = end
                state.finish_chunk()
        assert state.profile() == profile_of(state.loads())
        checked += 1
    while state.start(now, cost) is not None:
        state.finish_chunk()
        assert state.profile() == profile_of(state.loads())
    assert not state.placed and state.kv == 0 and state.preemptions > 0 and checked == 120
    assert isinstance(state.profile(), KvProfile)


@pytest.mark.parametrize("make", [ProjectedKv, LeastKv, MaxTokensWeighted])
def test_decode_policies_follow_a_pool_that_changes_a_few_snapshots_at_a_time(make):
    """The simulator's way: one list, a few entries replaced between picks; same picks as from scratch."""
    rng = random.Random(21)
    snaps = [random_snapshot(rng, i, True) for i in range(40)]
    kept, full, turn = make(), FullProjectedKv(), 0
    for _ in range(600):
        for _ in range(rng.choice([0, 1, 1, 2, 3, 12])):
            i = rng.randrange(len(snaps))
            snaps[i] = random_snapshot(rng, i, rng.random() < 0.8)
        placement = random_placement(rng)
        fresh = make()  # the reference for the baselines: no memory of earlier snapshots, the same turn
        fresh._turn = turn
        want = outcome(full, snaps, placement) if make is ProjectedKv else outcome(fresh, list(snaps), placement)
        if isinstance(want, str):
            turn += 1
        assert outcome(kept, snaps, placement) == want


def test_prefix_affinity_follows_a_pool_that_changes_a_few_snapshots_at_a_time():
    rng = random.Random(8)
    chains = [tuple(rng.getrandbits(40) for _ in range(6)) for _ in range(3)]

    def snap(i: int) -> InstanceSnapshot:
        cached = frozenset(h for chain in chains for h in chain[: rng.randint(0, 6)])
        return InstanceSnapshot(f"p{i}", "prefill", 0, rng.random() > 0.05,
                                queued_prefill_tokens=rng.choice([0, 0, 16, 40, 200]), cached_prefixes=cached)

    snaps = [snap(i) for i in range(30)]
    policy = PrefixAffinity()
    for turn in range(600):
        for _ in range(rng.choice([0, 1, 2, 9])):
            i = rng.randrange(len(snaps))
            snaps[i] = snap(i)
        placement = Placement(rng.randint(0, 120), 10, prefix_hashes=rng.choice(chains), block_tokens=16)
        assert policy.pick(snaps, placement) == full_prefix_pick(snaps, placement, turn)


def test_a_refused_request_retried_as_instances_change_gets_what_full_scoring_gives():
    """The admission queue's way: the same request again after each finish, while the pool is nearly full."""
    rng = random.Random(13)

    def nearly_full(i: int) -> InstanceSnapshot:
        running = tuple(random_load(rng) for _ in range(rng.randint(1, 4)))
        return InstanceSnapshot(f"i{i}", "decode", len(running), True, rng.choice([2_600, 2_950]), running,
                                profile=profile_of(running))

    snaps = [nearly_full(i) for i in range(8)]
    kept, full = ProjectedKv(), FullProjectedKv()
    large = Placement(1_400, 2_048, LengthPrediction(700, 1_500))
    outcomes = []
    for _ in range(400):
        for _ in range(rng.choice([0, 1, 1, 2])):
            i = rng.randrange(len(snaps))
            snaps[i] = nearly_full(i)
        placement = large if rng.random() < 0.8 else random_placement(rng)
        want = outcome(full, snaps, placement)
        assert outcome(kept, snaps, placement) == want
        outcomes.append(want)
    assert outcomes.count(Overloaded) > 20 and sum(isinstance(o, str) for o in outcomes) > 20


def test_refusal_message_and_hint_from_the_pool():
    full = InstanceSnapshot("full", "decode", 1, True, 1_100, profile=profile_of([RequestLoad(1_000, 5, 10, 100)]))
    policy = ProjectedKv(step_s_estimate=0.02)
    for _ in range(2):  # the second is a retry of the same load with nothing changed
        with pytest.raises(Overloaded, match="no decode instance of 1 has KV memory.*largest capacity 1100") as err:
            policy.pick([full], Placement(100, 500, LengthPrediction(50, 100)))
        assert err.value.retry_after_s == pytest.approx(5 * 0.02)
