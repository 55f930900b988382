"""Where a decode worker's KV listener is reached, and how a prefill worker picks its way there. Pure logic.

A decode worker advertises one string, which the router passes through untouched (`EngineInfo.kv_address`, then
`SendSpec.peer`): the routes it listens on, comma-separated, and the Ray node it runs on.

    "node:<ray node id>,shm:<abstract socket name>,tcp:<host>:<port>"     (transport "auto": both routes)
    "node:<ray node id>,tcp:10.0.0.2:41234"                               (transport "tcp")

The prefill's dialer picks per pair (`route`): shared memory when both workers run on the same node (an abstract
Unix socket lives in one host's network namespace), else tcp; `NoRoute` when neither fits.

The tcp host a decode worker binds and the one it advertises (`tcp_hosts`): it binds `transfer.bind_host` (all
interfaces by default, or its own address inside a CIDR), and advertises its own address inside
`transfer.advertise_cidr` when that is set, else the address it bound when that names one, else the node address
Ray reports for it: never a loopback or wildcard address that a peer on another node would dial in vain.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from kv_transfer.config import TransferConfig
from kv_transfer.transport import TransportError

NODE, SHM, TCP = "node", "shm", "tcp"


class NoRoute(TransportError):
    """No route the decode worker offers is open to this prefill worker (or no address to advertise)."""


@dataclass(frozen=True, slots=True)
class KVAddress:
    """The routes one decode worker's KV listener offers."""

    node_id: str = ""
    shm: str | None = None  # the abstract socket's name
    tcp: tuple[str, int] | None = None  # (host, port)

    def __str__(self) -> str:
        parts = [f"{NODE}:{self.node_id}"]
        if self.shm is not None:
            parts.append(f"{SHM}:{self.shm}")
        if self.tcp is not None:
            parts.append(f"{TCP}:{self.tcp[0]}:{self.tcp[1]}")
        return ",".join(parts)


def parse(address: str) -> KVAddress:
    """`str(KVAddress)` back; a malformed address raises ValueError naming it."""
    node, shm, tcp = "", None, None
    for part in address.split(","):
        kind, _, value = part.partition(":")
        if kind == NODE:
            node = value
        elif kind == SHM and value:
            shm = value
        elif kind == TCP and value:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"bad tcp route {value!r} in KV address {address!r}")
            tcp = (host, int(port))
        else:
            raise ValueError(f"unknown route {part!r} in KV address {address!r}")
    if shm is None and tcp is None:
        raise ValueError(f"the KV address {address!r} offers no route")
    return KVAddress(node, shm, tcp)


def route(address: str, local_node: str) -> tuple[str, str | tuple[str, int]]:
    """("shm", name) or ("tcp", (host, port)): how a prefill worker on `local_node` dials `address`."""
    peer = parse(address)
    if peer.shm is not None and peer.node_id == local_node:
        return SHM, peer.shm
    if peer.tcp is not None:
        return TCP, peer.tcp
    raise NoRoute(
        f"the decode worker at {address} listens on shared memory only, on node {peer.node_id or '?'}, and this "
        f"prefill worker runs on node {local_node or '?'}: set transfer.transport to auto or tcp"
    )


def _inside(cidr: str, candidates: Iterable[str]) -> str | None:
    network = ipaddress.ip_network(cidr, strict=False)
    for candidate in candidates:
        try:
            if ipaddress.ip_address(candidate.split("%")[0]) in network:
                return candidate
        except ValueError:
            continue  # not an IP address (a link-layer one, say)
    return None


def tcp_hosts(transfer: TransferConfig, node_ip: str, local_addresses: Iterable[str]) -> tuple[str, str]:
    """(host to bind, host to advertise) for a decode worker on a node whose interfaces have `local_addresses`
    and whose address, as Ray reports it, is `node_ip` ("" outside Ray: then loopback, one host only)."""
    local = list(local_addresses)
    bind = transfer.bind_host
    if "/" in bind:
        found = _inside(bind, local)
        if found is None:
            raise NoRoute(f"transfer.bind_host {bind}: no interface of this node has an address inside it "
                          f"(its addresses: {', '.join(local) or 'none'})")
        bind = found
    if transfer.advertise_cidr is not None:
        found = _inside(transfer.advertise_cidr, local)
        if found is None:
            raise NoRoute(f"transfer.advertise_cidr {transfer.advertise_cidr}: no interface of this node has an "
                          f"address inside it (its addresses: {', '.join(local) or 'none'})")
        return bind, found
    if not ipaddress.ip_address(bind).is_unspecified:
        return bind, bind
    return bind, node_ip or "127.0.0.1"
