"""`Dialer`: how a prefill worker opens an authenticated KV link to a decode worker, and says why it could not.

The dialer picks the route per pair (`kv_transfer.address.route`: shared memory on one node, tcp between nodes) and
runs the transport's handshake. A failure to connect is sorted into a `reason`, one word that a metric can carry:

    refused      nothing listens there (the connection was refused)
    unreachable  no route to the address (a network, a host or a firewall in between)
    timeout      no answer within `transfer.connect_timeout_s` (a blackhole), or a handshake that stalled
    auth         the peer does not hold the cluster secret
    no_route     no route the decode worker offers is open to this one (shared memory on another node)
    error        anything else (a broken handshake, a malformed address)

`probe` dials each peer once, runs the handshake, and closes the link: the readiness check at start-up. It dials
under a probe identity (`<instance>.probe`), so a decode worker never mistakes it for, and replaces with it, the
real link of the same prefill worker.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from kv_transfer import shm, tcp
from kv_transfer.address import SHM, NoRoute, route
from kv_transfer.endpoint import Endpoint
from kv_transfer.transport import AuthFailed, Transport, TransportConfig, TransportError

PROBE_SUFFIX = ".probe"
_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM, errno.EADDRNOTAVAIL}


def reason(error: BaseException) -> str:
    """The failure's kind, as the module docstring lists them."""
    if isinstance(error, NoRoute):
        return "no_route"
    if isinstance(error, AuthFailed):
        return "auth"
    if isinstance(error, TimeoutError):  # `TransportTimeout` is one
        return "timeout"
    cause = error.__cause__ if isinstance(error, TransportError) else error
    if isinstance(cause, ConnectionRefusedError):
        return "refused"
    if isinstance(cause, FileNotFoundError):  # an abstract socket nobody listens on
        return "refused"
    if isinstance(cause, OSError) and cause.errno in _UNREACHABLE:
        return "unreachable"
    return "error"


class Dialer:
    """Dials decode workers from a prefill worker on `local_node` (its Ray node id)."""

    def __init__(self, config: TransportConfig, local_node: str) -> None:
        self._config = config
        self._local_node = local_node

    def __call__(self, address: str, timeout: float) -> Transport:
        """An authenticated link to the decode worker at `address`; a `TransportError` (see `reason`) if none."""
        return self._dial(address, timeout, self._config)

    def _dial(self, address: str, timeout: float, config: TransportConfig) -> Transport:
        try:
            kind, target = route(address, self._local_node)
        except ValueError as e:  # a malformed address: nothing to dial
            raise NoRoute(str(e)) from e
        if kind == SHM:
            assert isinstance(target, str)
            return shm.connect(target, config, timeout)
        assert isinstance(target, tuple)
        return tcp.connect(target, config, timeout)

    def probe(self, peers: Sequence[tuple[str, str]], timeout: float) -> list[dict[str, str]]:
        """Dials every (instance id, address) once, all at once, and hangs up; one failure record per peer that
        could not be reached: {"instance_id", "address", "reason", "error"}."""
        me = self._config.endpoint
        config = replace(self._config, endpoint=Endpoint(me.instance_id + PROBE_SUFFIX, me.epoch))

        def one(peer: tuple[str, str]) -> dict[str, str] | None:
            instance_id, address = peer
            try:
                self._dial(address, timeout, config).close()
            except (TransportError, OSError) as e:
                return {"instance_id": instance_id, "address": address, "reason": reason(e),
                        "error": f"{type(e).__name__}: {e}"}
            return None

        if not peers:
            return []
        with ThreadPoolExecutor(max_workers=min(len(peers), 16), thread_name_prefix="pdkv-probe") as pool:
            return [failure for failure in pool.map(one, peers) if failure is not None]
