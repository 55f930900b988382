"""`pdserve_tools.netns` without making a cluster: namespaces that cannot be made raise `NamespaceError` (the
multinode fixture turns that into a failure, never a skip), and processes end by id, SIGKILL after the grace."""

import subprocess
import sys
import time

import pytest

from pdserve_tools.netns import NamespaceError, Node, kill_by_id, make_nodes, node_pair, two_nodes


def test_namespaces_that_cannot_be_made_raise_namespace_error_and_leave_nothing():
    bad = Node("no/such/ns", "10.213.0.1", "r", "pdbadva")  # `ip netns add` refuses a name with a slash
    with pytest.raises(NamespaceError, match="root and iproute2"), two_nodes(bad, bad):
        pytest.fail("the cluster came up")


def test_node_pair_names_fit_the_kernel_and_offer_a_unit_per_cpu():
    a, b = node_pair("abc123", ("p", "d"), cpus=(2, 1), prefix="pdbm")
    assert (a.netns, b.netns, a.ip, b.ip) == ("pdbmA-abc123", "pdbmB-abc123", "10.213.0.1", "10.213.0.2")
    assert len(a.dev) <= 15 and a.dev != b.dev  # IFNAMSIZ
    assert (a.cpus, a.units, b.cpus, b.units, a.resource, b.resource) == (2, 2, 1, 1, "p", "d")


def test_kill_by_id_terminates_and_kills_what_ignores_sigterm():
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True)\n"
                                 "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout is not None and stubborn.stdout.readline() == "ready\n"
    started = time.monotonic()
    kill_by_id([polite.pid, stubborn.pid], grace_s=0.5)
    assert polite.wait(timeout=10) == -15 and stubborn.wait(timeout=10) == -9
    assert time.monotonic() - started < 5


def test_three_nodes_each_with_its_own_address_device_and_switch_port_and_a_shared_resource():
    a, b, c = make_nodes("abc123", ("p", "nb", "nc"), also=((), ("d",), ("d",)))
    assert [n.ip for n in (a, b, c)] == ["10.213.0.1", "10.213.0.2", "10.213.0.3"]
    assert c.netns == "pdmnC-abc123"
    devices = {n.dev for n in (a, b, c)} | {n.port for n in (a, b, c)}
    assert len(devices) == 6 and all(len(d) <= 15 for d in devices)
    assert (a.resources, b.resources, c.resources) == ({"p": 1}, {"nb": 1, "d": 1}, {"nc": 1, "d": 1})
