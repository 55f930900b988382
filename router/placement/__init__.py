"""Placement: which instance takes a request. Pure code: plain data in (`InstanceSnapshot`s and the request's
`Placement`), an instance id out.

- `snapshot`: `InstanceSnapshot`, an instance's load at a moment, and `RequestLoad`, one request it holds;
- `query`: `Placement`, what a policy may know of the request it places;
- `policy`: the `Policy` protocol (filter -> score -> pick), what a policy needs (`Need`), the shared filter;
- `load`, `kv`, `prefix`: the policies (by load; by KV memory and predicted length; by prefill work);
- `sorted_pool`: instances kept in score order across picks;
- `registry`: the one registry of policies by name.
"""

from router.placement.policy import Need, Policy, needs_detail
from router.placement.query import EMPTY, Placement
from router.placement.registry import POLICIES, make_policy, policy_names
from router.placement.snapshot import InstanceSnapshot, RequestLoad

__all__ = ["EMPTY", "POLICIES", "InstanceSnapshot", "Need", "Placement", "Policy", "RequestLoad", "make_policy",
           "needs_detail", "policy_names"]
