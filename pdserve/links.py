"""The readiness check of a disaggregated deployment's KV links, at start-up.

`check_links` has every prefill instance dial every decode instance's KV listener once (the authenticated
handshake, then it hangs up: `PrefillWorker.probe_kv`), all at once. A pair that cannot connect (a listener bound
where peers cannot reach it, an address that does not route between the nodes, a different cluster secret) fails
the start with `KVLinksDown`, naming each such pair and address, rather than slowing every request it would serve.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from common.results import KVLinkFailure
from common.roles import Role


class KVLinksDown(RuntimeError):
    """Some prefill instance cannot open a KV link to some decode instance."""

    def __init__(self, failures: Sequence[KVLinkFailure]) -> None:
        lines = "\n".join(f"  - {f}" for f in failures)
        super().__init__(
            f"{len(failures)} KV link(s) cannot be made, so transfers between these instances would fail:\n{lines}\n"
            "Check that the decode workers' nodes are reachable from the prefill workers' at the advertised "
            "addresses (transfer.bind_host, transfer.advertise_cidr, firewalls) and that every node holds the same "
            "cluster secret."
        )
        self.failures = list(failures)


async def check_links(instances: Sequence[Any]) -> None:
    """Raises `KVLinksDown` unless every prefill instance reaches every decode instance's KV listener.

    `instances`: the router's `Instance`s (instance_id, role, handle, info); other roles are ignored.
    """
    peers = [(i.instance_id, i.info.kv_address) for i in instances if i.role == Role.DECODE]
    prefills = [i for i in instances if i.role == Role.PREFILL]
    if not peers or not prefills:
        return
    found = await asyncio.gather(*(p.handle.probe_kv.remote(peers) for p in prefills))
    failures = [failure for per_prefill in found for failure in per_prefill]
    if failures:
        raise KVLinksDown(failures)
