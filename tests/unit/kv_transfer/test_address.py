"""KV addresses: what a decode worker advertises, the route a prefill worker picks per pair, and the tcp host a
decode worker binds and advertises (never one a peer on another node would dial in vain)."""

from __future__ import annotations

import pytest

from kv_transfer.address import KVAddress, NoRoute, parse, route, tcp_hosts
from kv_transfer.config import ConnectorSettings, TransferConfig

BOTH = str(KVAddress("node-b", "pdkv-0123", ("10.0.0.2", 41234)))


def test_an_address_names_its_node_and_every_route_and_reads_back():
    assert BOTH == "node:node-b,shm:pdkv-0123,tcp:10.0.0.2:41234"
    assert parse(BOTH) == KVAddress("node-b", "pdkv-0123", ("10.0.0.2", 41234))
    v6 = KVAddress("n", None, ("fd00::2", 7))
    assert parse(str(v6)) == v6


@pytest.mark.parametrize("bad", ["", "node:n", "udp:1.2.3.4:5", "tcp:10.0.0.2", "tcp::80", "tcp:h:port"])
def test_a_malformed_address_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="KV address"):
        parse(bad)


def test_workers_of_one_node_share_memory_and_workers_of_two_nodes_use_tcp():
    assert route(BOTH, local_node="node-b") == ("shm", "pdkv-0123")
    assert route(BOTH, local_node="node-a") == ("tcp", ("10.0.0.2", 41234))
    tcp_only = str(KVAddress("node-b", None, ("10.0.0.2", 41234)))
    assert route(tcp_only, local_node="node-b") == ("tcp", ("10.0.0.2", 41234))


def test_shared_memory_on_another_node_is_no_route_and_says_what_to_change():
    shm_only = str(KVAddress("node-b", "pdkv-0123", None))
    with pytest.raises(NoRoute, match="runs on node node-a: set transfer.transport to auto or tcp"):
        route(shm_only, local_node="node-a")


LOCAL = ["127.0.0.1", "::1", "192.168.5.7", "10.213.0.2", "fe80::1%eth0"]


def test_by_default_the_listener_binds_every_interface_and_advertises_the_node_address_ray_reports():
    assert tcp_hosts(TransferConfig(), "10.213.0.2", LOCAL) == ("0.0.0.0", "10.213.0.2")
    assert tcp_hosts(TransferConfig(), "", LOCAL) == ("0.0.0.0", "127.0.0.1")  # outside Ray: one host only


def test_an_operator_cidr_picks_the_interface_to_advertise():
    config = TransferConfig(advertise_cidr="10.213.0.0/24")
    assert tcp_hosts(config, "192.168.5.7", LOCAL) == ("0.0.0.0", "10.213.0.2")


def test_a_bind_cidr_binds_and_advertises_the_nodes_own_address_inside_it():
    assert tcp_hosts(TransferConfig(bind_host="10.213.0.0/16"), "192.168.5.7", LOCAL) == ("10.213.0.2", "10.213.0.2")
    assert tcp_hosts(TransferConfig(bind_host="192.168.5.7"), "10.213.0.2", LOCAL) == ("192.168.5.7", "192.168.5.7")


@pytest.mark.parametrize("field", ["bind_host", "advertise_cidr"])
def test_a_cidr_no_interface_is_in_fails_the_start_naming_the_nodes_addresses(field):
    with pytest.raises(NoRoute, match=f"transfer.{field} 172.16.0.0/12: no interface .* 10.213.0.2"):
        tcp_hosts(TransferConfig(**{field: "172.16.0.0/12"}), "10.213.0.2", LOCAL)


@pytest.mark.parametrize(("values", "field"), [
    ({"transport": "rdma"}, "transport"),
    ({"bind_host": "eth0"}, "bind_host"),
    ({"advertise_cidr": "10.0.0.0/33"}, "advertise_cidr"),
    ({"kv_port": 65536}, "kv_port"),
])
def test_bad_transfer_settings_are_refused_by_name(values, field):
    with pytest.raises(ValueError, match=f"transfer.{field}"):
        TransferConfig(**values)


def test_auto_is_the_default_transport():
    assert TransferConfig().transport == "auto"


def test_connector_settings_carry_the_node_the_actor_stamped_and_refuse_unknown_keys():
    settings = ConnectorSettings("decode-0", 7, TransferConfig(advertise_cidr="10.0.0.0/8"), "node-b", "10.0.0.2")
    assert ConnectorSettings.from_extra(settings.to_extra()) == settings
    with pytest.raises(ValueError, match="unknown KV connector settings"):
        ConnectorSettings.from_extra({**settings.to_extra(), "tcp_host": "0.0.0.0"})
    with pytest.raises(ValueError, match="unknown transfer settings"):
        ConnectorSettings.from_extra({**settings.to_extra(), "transfer": {"tcp_host": "0.0.0.0"}})
    extra = settings.to_extra()
    del extra["node_ip"]
    with pytest.raises(ValueError, match="lack 'node_ip'"):
        ConnectorSettings.from_extra(extra)
