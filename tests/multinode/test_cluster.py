"""pdserve across two Ray nodes (two network namespaces of this machine): the prefill worker on node A, the decode
worker on node B, the KV streamed between them, with the default transfer settings (transport auto; the decode
worker binds every interface and advertises the node address Ray reports for it).

One deployment serves the whole module, and its tests run in this order:
- the workers run on different nodes, and the start-up check of their KV links passes;
- when the prefill cannot reach the decode worker's KV listener (the test cuts that one port), it says so at once:
  the decode instance prefills the prompt itself (exact output, well inside the transfer deadline), the router
  counts the failure by reason, the prefill logs a WARNING naming both ends, and the start-up check names the pair
  and the address;
- once mended, greedy output across the nodes equals one plain vLLM engine's token for token, every transfer lands
  (the decode waited for KV; it did not recompute) and no KV transfer fails.
"""

from __future__ import annotations

from typing import Any

import pytest

from pdserve_tools.netns import Cluster, netns_of
from tests.multinode.conftest import PROMPTS, inspect, sample, serve, total

pytestmark = pytest.mark.integration

DEADLINE_S = 30.0  # transfer.deadline_s: what a request would stall for if nothing noticed the failure


@pytest.fixture(scope="module")
def served(cluster: Cluster, tiny_model, tmp_path_factory):
    with serve(cluster, tiny_model, tmp_path_factory.mktemp("pdserve"), "pdserve-1p1d",
               decode={"instances": 1, "resources": {cluster.b.resource: 1}}, deadline_s=DEADLINE_S) as s:
        yield s


@pytest.fixture(scope="module")
def decode_kv_address(served) -> str:
    report = inspect(served)
    served.report = report
    (decode,) = [i for i in report["instances"] if i["role"] == "decode"]
    return str(decode["kv_address"])


def test_prefill_and_decode_run_on_different_nodes_and_their_links_check_out(served, cluster, decode_kv_address):
    by_id = {i["instance_id"]: i for i in served.report["instances"]}
    assert sorted(by_id) == ["decode-0", "prefill-0"]
    assert netns_of(by_id["prefill-0"]["pid"]) == cluster.a.netns
    assert netns_of(by_id["decode-0"]["pid"]) == cluster.b.netns
    # transport auto: shared memory for workers of the decode's own node, tcp at the address Ray reports for it
    assert f",tcp:{cluster.b.ip}:" in decode_kv_address and ",shm:" in decode_kv_address
    assert served.report["links"] == "ok"


def test_a_decode_peer_that_cannot_be_reached_means_recompute_at_once_counted_and_logged(
        served, cluster, reference, decode_kv_address):
    port = int(decode_kv_address.rpartition(":")[2])
    cluster.cut(port)
    try:
        answer = served.client(PROMPTS[1])
        links = inspect(served)["links"]
    finally:
        cluster.mend()
    (done,) = answer["completions"]
    assert done["token_ids"] == reference.single[PROMPTS[1]][0]
    assert done["final"]["timings"]["end_to_end"] < DEADLINE_S / 2  # it did not wait out the transfer deadline
    assert sample(answer["metrics"], "pdserve_kv_transfer_failures_total", reason="unreachable") == 1
    assert sample(answer["metrics"], "pdserve_kv_transfers_total", result="failed") == 0  # no decode waited for it
    where = f"tcp:{cluster.b.ip}:{port}"
    line = served.wait_for("will not come", timeout=60)  # the prefill's WARNING, forwarded to the driver's log
    for part in ("unreachable", "prefill-0", cluster.a.ip, "decode-0", where, "No route to host"):
        assert part in line, line
    assert "1 KV link(s) cannot be made" in links
    for part in ("unreachable", "prefill-0", cluster.a.ip, "decode-0", where):
        assert part in links, links


@pytest.fixture(scope="module")
def answers(served) -> dict[str, Any]:
    return served.client(*PROMPTS)


def test_greedy_tokens_across_nodes_equal_plain_vllm(answers, reference):
    for done in answers["completions"]:
        assert done["token_ids"] == reference.single[done["index"]][0], done["index"]
        assert (done["final"]["prefill_instance"], done["final"]["decode_instance"]) == ("prefill-0", "decode-0")


def test_every_transfer_lands_and_none_fails(answers):
    before, after = answers["metrics_before"], answers["metrics"]

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("pdserve_kv_transfers_total", result="ok") == len(PROMPTS)
    assert grew("pdserve_kv_transfers_total", result="failed") == 0
    assert total(after, "pdserve_kv_transfer_failures_total") == total(before, "pdserve_kv_transfer_failures_total")
    assert grew("pdserve_kv_transfer_bytes_total") > 0
    for done in answers["completions"]:
        t = done["final"]["timings"]
        # The decode waited for KV that landed: nowhere near the deadline a recompute would have waited out.
        assert 0 <= t["kv_transfer"] < DEADLINE_S / 3 and t["end_to_end"] < DEADLINE_S / 3, t
