"""The one registry of placement policies: name -> policy class (its factory). Pure code.

Each policy states, as class attributes, the roles it may place and what it reads (see `router.placement.policy`),
so this module holds no list of names beyond the registry itself: `router.policy` takes any policy that places
decode (or colocated) instances, `router.prefill_policy` any that places prefill instances. `make_policy` builds
a fresh one: a policy may keep state (a round-robin turn, a sorted pool), so every user gets its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from common.roles import Role
from router.placement.kv import LeastKv, MaxTokensWeighted, ProjectedKv
from router.placement.load import LeastOutstanding, RoundRobin
from router.placement.policy import Policy
from router.placement.prefix import PrefixAffinity

_CLASSES: tuple[type[Policy], ...] = (RoundRobin, LeastOutstanding, ProjectedKv, LeastKv, MaxTokensWeighted,
                                      PrefixAffinity)
POLICIES: Mapping[str, type[Policy]] = MappingProxyType({cls.name: cls for cls in _CLASSES})


def policy_names(role: Role) -> list[str]:
    """The names of the policies that may place instances of `role`, sorted."""
    return sorted(name for name, cls in POLICIES.items() if role in cls.places)


def make_policy(name: str) -> Policy:
    """A new policy of that name; ValueError naming every known one when there is none."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
