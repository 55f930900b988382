"""The one registry of placement policies: names, the roles each policy places, and the config's check."""

from __future__ import annotations

import pytest

from common.roles import Role
from router.config import RouterConfig
from router.placement import POLICIES, Need, make_policy, policy_names


def test_an_unknown_name_is_refused_with_every_known_one():
    with pytest.raises(ValueError, match="unknown policy 'fastest'; choose one of") as refused:
        make_policy("fastest")
    assert all(repr(name) in str(refused.value) for name in POLICIES)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_each_policy_is_registered_under_its_own_name_and_declares_what_it_places_and_needs(name):
    policy = make_policy(name)
    assert policy.name == name and type(policy) is POLICIES[name]
    assert policy.places and Need.LOAD in policy.needs
    assert make_policy(name) is not policy  # each caller gets its own state


def test_the_roles_a_policy_places_decide_where_the_config_may_name_it():
    assert policy_names(Role.PREFILL) == ["least_outstanding", "prefix_affinity", "round_robin"]
    assert policy_names(Role.DECODE) == policy_names(Role.COLOCATED) == sorted(POLICIES)
    RouterConfig(policy="projected_kv", prefill_policy="prefix_affinity")
    with pytest.raises(ValueError, match=r"router.prefill_policy must be one of \['least_outstanding', "
                                         r"'prefix_affinity', 'round_robin'\], got 'projected_kv'"):
        RouterConfig(prefill_policy="projected_kv")
    with pytest.raises(ValueError, match=r"router.policy must be one of \[.*'projected_kv'.*\], got 'fastest'"):
        RouterConfig(policy="fastest")
