"""The client's conversions and the committed stubs, against the .proto contract."""

import filecmp
import importlib.util
from pathlib import Path

from pdserve_client._wire import Sampling, build_request, chunk_from_proto
from pdserve_client.v1 import pdserve_pb2 as pb

ROOT = Path(__file__).resolve().parents[3]


def test_committed_stubs_match_the_proto(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.generate(tmp_path)
    committed = ROOT / "client" / "pdserve_client" / "v1"
    names = sorted(p.name for p in tmp_path.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(tmp_path, committed, names, shallow=False)
    assert (mismatch, errors) == ([], []), "stubs are stale: run `make proto`"
    assert "pdserve_pb2.py" in match


def test_text_prompt_and_sampling():
    msg = build_request("hello", Sampling(max_tokens=7, temperature=0.0, seed=3), model="m")
    assert msg.WhichOneof("input") == "prompt" and msg.prompt == "hello" and msg.model == "m"
    assert msg.sampling.max_tokens == 7
    assert msg.sampling.HasField("temperature") and msg.sampling.temperature == 0.0
    assert msg.sampling.seed == 3
    assert not msg.sampling.HasField("top_p")


def test_chat_and_token_prompts():
    chat = build_request([{"role": "user", "content": "hi"}], Sampling())
    assert chat.WhichOneof("input") == "chat"
    assert [(m.role, m.content) for m in chat.chat.messages] == [("user", "hi")]
    ids = build_request([5, 6, 7], Sampling())
    assert ids.WhichOneof("input") == "prompt_token_ids" and list(ids.prompt_token_ids.ids) == [5, 6, 7]


def test_final_chunk_carries_usage_timings_and_tpot():
    msg = pb.GenerateResponse(request_id="r", token_ids=[1, 2], text="ab")
    msg.final.finish_reason = pb.FINISH_REASON_LENGTH
    msg.final.usage.completion_tokens = 5
    msg.final.timings.time_to_first_token = 0.5
    msg.final.timings.end_to_end = 1.3
    chunk = chunk_from_proto(msg)
    assert chunk.token_ids == [1, 2] and chunk.text == "ab"
    assert chunk.final.finish_reason == "length"
    assert chunk.final.time_per_output_token == 0.2
    assert chunk_from_proto(pb.GenerateResponse(request_id="r")).final is None
