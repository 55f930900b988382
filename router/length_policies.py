"""The length-aware policies by name, for `pdserve.router.policy.POLICIES` (which imports this late)."""

from __future__ import annotations

from collections.abc import Callable

from pdserve.router.kv_placement import LeastKv, MaxTokensWeighted, ProjectedKv
from pdserve.router.policy import Policy
from pdserve.router.prefill_placement import PrefixAffinity

LENGTH_AWARE: dict[str, Callable[[], Policy]] = {
    "projected_kv": ProjectedKv,
    "least_kv": LeastKv,
    "max_tokens_weighted": MaxTokensWeighted,
    "prefix_affinity": PrefixAffinity,
}
