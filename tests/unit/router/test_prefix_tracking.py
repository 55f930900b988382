"""Prefix-aware placement at the router: prompt block hashes, the tracked prefix cache of each instance, the policy
over them, and the metrics that count what the caches saved."""

from __future__ import annotations

from common.results import EngineInfo
from common.sampling import SamplingSpec
from router.cleanups import Cleanups
from router.handoff import Disaggregated, Handoff
from router.metrics import RouterMetrics
from router.placement import Placement, make_policy
from router.placement.tracked import TrackedPrefixes, block_hashes, skipped_tokens
from router.receive_budget import ReceiveBudget
from router.registry import Instance, Registry
from router.request import Request
from router.run import Run
from router.stream import Streams
from router.timings import Clock

B = 4  # tokens per block


def prompt(*blocks: int, tail: int = 0) -> list[int]:
    """Whole blocks of one repeated token each, then `tail` tokens of a partial block."""
    return [t for b in blocks for t in [b] * B] + [7] * tail


def placement_of(ids: list[int]) -> Placement:
    return Placement(len(ids), 8, prefix_hashes=block_hashes(ids, B), block_tokens=B)


def test_prompts_share_their_hashes_up_to_the_first_block_that_differs():
    a = block_hashes(prompt(1, 2, 3, 4), B)
    b = block_hashes(prompt(1, 2, 9, 4, tail=3), B)
    assert len(a) == len(b) == 4  # the partial block has no hash
    assert a[:2] == b[:2]
    assert a[2] != b[2] and a[3] != b[3]  # a chain: block 3 is the same tokens, after a different block 2
    assert block_hashes(prompt(1, 2, 3, 4), B) == a  # the same prompt, the same hashes
    assert block_hashes(prompt(5, 2), B)[1] != a[1]
    assert block_hashes([1, 2, 3], B) == ()


def test_the_tracked_set_finds_leading_blocks_and_evicts_the_least_recent_past_capacity():
    tracked = TrackedPrefixes(capacity_blocks=5)
    first = placement_of(prompt(1, 2, 3, tail=1))
    assert (tracked.route(first).hit, len(tracked)) == (0, 3)
    again = tracked.route(placement_of(prompt(1, 2, 3, 4, tail=1)))  # the next turn of the conversation
    assert (again.blocks, again.hit, again.saved_tokens) == (4, 3, 3 * B)
    other = tracked.route(placement_of(prompt(8, 9, tail=1)))  # 6 blocks for 5: the oldest, block 4's, goes
    assert (other.hit, len(tracked)) == (0, 5)
    assert tracked.route(placement_of(prompt(1, 2, 3, 4, 5))).hit == 3
    # Now 1, 2, 3, 4, 5 are the most recent: 8 and 9 went, tail (9) first then head.
    assert tracked.route(placement_of(prompt(8, 9, tail=1))).hit == 0


def test_a_prompt_longer_than_the_cache_keeps_its_head_and_a_zero_cache_tracks_nothing():
    tracked = TrackedPrefixes(capacity_blocks=2)
    tracked.route(placement_of(prompt(1, 2, 3, 4)))
    assert tracked.route(placement_of(prompt(1, 2, 3, 4))).hit == 2
    nothing = TrackedPrefixes(capacity_blocks=0)
    nothing.route(placement_of(prompt(1, 2)))
    assert nothing.route(placement_of(prompt(1, 2))).hit == 0 and len(nothing) == 0


def test_the_engine_always_computes_the_prompts_last_token():
    whole = placement_of(prompt(1, 2, 3))  # exactly three blocks: the third is computed again for its last token
    assert skipped_tokens(whole, 3) == 2 * B
    assert skipped_tokens(placement_of(prompt(1, 2, 3, tail=1)), 3) == 3 * B
    assert skipped_tokens(Placement(0, 1, block_tokens=B), 0) == 0


def instance(iid: str, role: str, prefix_caching: bool = True) -> Instance:
    return Instance(iid, role, None, EngineInfo(256, B, 64, prefix_caching=prefix_caching), None)


def test_prefix_affinity_follows_the_conversation_unless_that_queue_outweighs_the_saving():
    warm, cold = instance("p0", "prefill"), instance("p1", "prefill")
    registry = Registry([warm, cold])
    policy = make_policy("prefix_affinity")
    turn1 = prompt(1, 2, 3, 4, 5, tail=2)
    turn2 = placement_of(turn1 + [9] * 6 + prompt(6, 7, tail=4))  # 40 tokens, the first 5 blocks held
    warm.computes(placement_of(turn1))
    assert registry.pick(policy, "prefill", turn2).instance_id == "p0"  # 0 + 40 - 20 < 0 + 40
    warm.queued_prefill_tokens = 20  # 20 + 20 = 40: a tie on work goes to fewer outstanding requests
    cold.outstanding = 1
    assert registry.pick(policy, "prefill", turn2).instance_id == "p0"
    warm.queued_prefill_tokens = 21  # 21 + 20 > 40
    assert registry.pick(policy, "prefill", turn2).instance_id == "p1"
    warm.restarted(warm.info)  # a fresh engine has nothing cached
    warm.queued_prefill_tokens = 0
    assert registry.pick(policy, "prefill", turn2).instance_id == "p0"  # 0 + 40 vs 0 + 40, fewer outstanding
    assert registry.pick(policy, "prefill", turn2).instance_id == "p0"
    assert warm.snapshot(detailed=True).cached_prefixes == set()


def value(metrics: RouterMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def test_the_metrics_count_blocks_routed_hit_and_prefill_tokens_saved():
    metrics = RouterMetrics()
    streams = Streams(metrics, Cleanups())
    prefill, decode = instance("p0", "prefill"), instance("d0", "decode", prefix_caching=False)
    turn1 = prompt(1, 2, 3, tail=1)
    assert streams.computes(prefill, placement_of(turn1)) == 13
    assert streams.computes(prefill, placement_of(turn1 + prompt(4, tail=2))) == 19 - 3 * B
    assert streams.computes(decode, placement_of(turn1)) == 13  # no prefix cache there: not counted
    assert value(metrics, "pdserve_prefix_blocks_routed_total") == 3 + 4
    assert value(metrics, "pdserve_prefix_blocks_hit_total") == 3
    assert value(metrics, "pdserve_prefix_saved_prefill_tokens_total") == 3 * B
    assert len(decode.prefixes) == 0


def test_a_legs_placement_hashes_its_context_once_per_leg():
    request = Request("r", SamplingSpec(max_tokens=10), prompt_token_ids=tuple(prompt(1, 2, tail=3)))
    run = Run(request, prompt(1, 2, tail=3), Clock(arrival=0.0), text=None, block_tokens=B)
    run.legs = 1
    first = run.placement()
    assert first.prefix_hashes == block_hashes(prompt(1, 2), B) and first.block_tokens == B
    assert run.placement().prefix_hashes is first.prefix_hashes
    run.generated = [7]  # a later leg continues from the prompt and the tokens sent: now three whole blocks
    run.legs = 2
    assert run.placement().prefix_hashes == block_hashes(prompt(1, 2, 7), B)


def test_the_work_ahead_of_a_first_token_leaves_out_what_the_prefix_cache_holds():
    warm, cold = instance("p0", "prefill"), instance("p1", "prefill")
    decode = instance("d0", "decode", prefix_caching=False)
    turn1 = prompt(1, 2, 3, 4, 5, tail=2)  # 22 tokens
    turn2 = placement_of(turn1 + [9] * 6 + prompt(6, 7, tail=4))  # 40 tokens, the first 5 blocks held on p0
    warm.computes(placement_of(turn1))
    assert warm.prefill_work(turn2) == (0, 40 - 5 * B)
    assert cold.prefill_work(turn2) == (0, 40)
    decode.computes(turn2)  # no prefix cache: it computes every token, every time
    decode.queued_prefill_tokens = 7
    assert decode.prefill_work(turn2) == (7, 40)
    disaggregated = Disaggregated(Handoff(30.0, 0, ReceiveBudget(1 << 20), make_policy("least_outstanding")),
                                  Registry([warm, cold, decode]), Streams(RouterMetrics(), Cleanups()), Cleanups())
    assert disaggregated.least_work(turn2) == (0, 20)  # the shed projection's instance: the warm one
    warm.queued_prefill_tokens = 21  # 21 + 20 > 0 + 40
    assert disaggregated.least_work(turn2) == (0, 40)
