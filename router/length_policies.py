"""The length-aware policies by name, for `router.policy.POLICIES` (which imports this late)."""

from __future__ import annotations

from collections.abc import Callable

from router.kv_placement import LeastKv, MaxTokensWeighted, ProjectedKv
from router.policy import Policy
from router.prefill_placement import PrefixAffinity

LENGTH_AWARE: dict[str, Callable[[], Policy]] = {
    "projected_kv": ProjectedKv,
    "least_kv": LeastKv,
    "max_tokens_weighted": MaxTokensWeighted,
    "prefix_affinity": PrefixAffinity,
}
