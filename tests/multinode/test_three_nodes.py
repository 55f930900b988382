"""pdserve 1P2D across three Ray nodes (three network namespaces of this machine): the prefill worker on node A, one
decode worker on node B and one on node C (the decode pool asks for a resource both nodes offer, one unit each),
placed round-robin so both decode instances serve, with the default transfer settings.

One deployment serves the whole module, and its tests run in this order:
- each worker runs on a node of its own, and the start-up check of every KV link passes;
- text prompts one at a time, a chat conversation and concurrent streams, across the nodes, equal one plain vLLM
  engine's tokens; both decode instances served; every transfer landed and none failed;
- node C is lost whole (SIGKILL to every process in its namespace: its raylet, its decode worker and the engine
  process under it) while six streams run on the two decode instances: every stream ends with plain vLLM's tokens,
  those that ran on node C after resuming elsewhere. This test ends the cluster's node C, so it runs last.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from transformers import AutoTokenizer

from pdserve_tools.netns import netns_of
from tests.integration.conftest import greedy, plain_engine, prompts
from tests.multinode.client import CHAT, STARTED
from tests.multinode.conftest import DECODE, PROMPTS, inspect, sample, serve, total

pytestmark = pytest.mark.integration

CONCURRENT = (1, 2, 3, 4, 5, 6)  # prompt indices: 7 to 773 tokens
TOKENS = 120  # per stream, EOS ignored, in the streams a node's loss interrupts
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def plain(tiny_model) -> dict[str, Any]:
    """One plain vLLM engine's greedy tokens: the chat conversation through the chat template (as the router
    applies it) and the long streams."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    chat = tok.encode(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)
    with plain_engine(tiny_model) as llm:
        return {"chat": greedy(llm, [chat])[0][0], "chat_prompt_tokens": len(chat),
                "long": {i: greedy(llm, [prompts()[i]], TOKENS, ignore_eos=True)[0][0] for i in CONCURRENT}}


@pytest.fixture(scope="module")
def served(plain, cluster, tiny_model, tmp_path_factory):  # the plain engine has finished before the workers start
    with serve(cluster, tiny_model, tmp_path_factory.mktemp("pdserve"), "pdserve-1p2d",
               decode={"instances": 2, "resources": {DECODE: 1}}, router={"policy": "round_robin"},
               deadline_s=DEADLINE_S) as s:
        s.report = inspect(s)
        yield s


@pytest.fixture(scope="module")
def node_of(served, cluster) -> dict[str, str]:
    """Each instance's node, by the namespace its process runs in: "a", "b" or "c"."""
    names = {node.netns: letter for letter, node in zip("abc", cluster.nodes, strict=True)}
    return {i["instance_id"]: names[netns_of(i["pid"])] for i in served.report["instances"]}


def test_each_worker_runs_on_a_node_of_its_own_and_every_link_checks_out(served, node_of):
    assert node_of["prefill-0"] == "a"
    assert sorted([node_of["decode-0"], node_of["decode-1"]]) == ["b", "c"]
    assert served.report["links"] == "ok"


def landed(answers: dict[str, Any], count: int) -> None:
    """`count` transfers landed between the client's two reads of /metrics, and no transfer failed ever."""
    before, after = answers["metrics_before"], answers["metrics"]
    ok = sample(after, "pdserve_kv_transfers_total", result="ok") - \
        sample(before, "pdserve_kv_transfers_total", result="ok")
    assert ok == count
    assert sample(after, "pdserve_kv_transfers_total", result="failed") == 0
    assert total(after, "pdserve_kv_transfer_failures_total") == 0


def test_text_and_chat_across_three_nodes_equal_plain_vllm(served, reference, plain):
    answers = served.client(*PROMPTS, "chat")
    *text, chat = answers["completions"]
    for done in text:
        assert done["token_ids"] == reference.single[done["index"]][0], done["index"]
    assert chat["token_ids"] == plain["chat"]
    assert chat["final"]["prompt_tokens"] == plain["chat_prompt_tokens"]
    # Round-robin: consecutive requests alternate between the decode instances on B and C.
    assert {d["final"]["decode_instance"] for d in answers["completions"]} == {"decode-0", "decode-1"}
    assert {d["final"]["prefill_instance"] for d in answers["completions"]} == {"prefill-0"}
    landed(answers, len(PROMPTS) + 1)


def test_concurrent_streams_across_three_nodes_equal_plain_vllm(served, plain):
    run = served.streams(*CONCURRENT, max_tokens=TOKENS)
    run.wait_for(STARTED, timeout=240)
    answers = finished(run)
    for done in answers["completions"]:
        assert done["token_ids"] == plain["long"][done["index"]], done["index"]
    assert {d["final"]["decode_instance"] for d in answers["completions"]} == {"decode-0", "decode-1"}
    landed(answers, len(CONCURRENT))


def finished(run) -> dict[str, Any]:
    """What a streaming client printed last, once it has ended by itself."""
    assert run.proc.wait(timeout=240) == 0, run.output()[-4000:]
    run.stop()
    result: dict[str, Any] = json.loads(next(line for line in reversed(run.lines) if line.startswith("{")))
    return result


def test_losing_a_whole_decode_node_mid_stream_loses_no_request(served, cluster, node_of, plain):
    (victim,) = [i for i, node in node_of.items() if node == "c"]
    run = served.streams(*CONCURRENT, max_tokens=TOKENS)
    try:
        run.wait_for(STARTED, timeout=240)  # every stream has its first token: three of them decode on node C
        killed = cluster.kill_node(cluster.c)
        answers = finished(run)
    finally:
        run.stop()
    assert len(killed) >= 2  # at least the raylet and the decode worker
    for done in answers["completions"]:
        assert done["token_ids"] == plain["long"][done["index"]], done["index"]
        assert done["final"]["completion_tokens"] == TOKENS
        assert done["final"]["decode_instance"] != victim  # those on node C finished elsewhere
    resumed = sample(answers["metrics"], "pdserve_requests_resumed_total") - \
        sample(answers["metrics_before"], "pdserve_requests_resumed_total")
    assert resumed >= 1
