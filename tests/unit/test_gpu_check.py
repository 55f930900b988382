"""The GPU check's pure policy: which steps run on which machine, and the JSON it writes."""

from __future__ import annotations

import json
from pathlib import Path

from pdserve_tools.gpu_check import Machine, Step, junit_counts, plan, report, write


def _runs(machine: Machine) -> dict[str, str]:
    return {s.name: "ran" if s.run else s.reason for s in plan(machine)}


def test_one_gpu_runs_the_tests_and_the_raw_copy_and_says_why_nccl_cannot() -> None:
    assert _runs(Machine(gpus=1, cupy=True, vllm_cuda=True)) == {
        "tests": "ran", "raw_copy": "ran",
        "nccl_bench": "NCCL refuses two ranks on one GPU: needs two GPUs",
        "greedy": "NCCL refuses two ranks on one GPU: needs two GPUs",
    }


def test_two_gpus_run_everything_and_a_missing_vllm_skips_only_the_greedy_check() -> None:
    assert set(_runs(Machine(2, True, True)).values()) == {"ran"}
    assert _runs(Machine(2, True, False))["greedy"] == "vLLM for CUDA is not installed"
    assert _runs(Machine(0, False, False))["raw_copy"] == "no CUDA device"
    assert _runs(Machine(1, False, False))["raw_copy"] == "cupy with NCCL is not installed"


def test_the_report_holds_the_ratio_of_the_two_bandwidths_and_every_step(tmp_path: Path) -> None:
    steps = plan(Machine(2, True, False))
    steps[1].result, steps[2].result = {"gbps": 400.0}, {"gbps": 100.0}
    path = tmp_path / "docs" / "nccl-gpu.json"
    write(path, report(Machine(2, True, False), steps, "GPU 0: H100"))
    doc = json.loads(path.read_text())
    assert doc["bandwidth"] == {"nccl_gbps": 100.0, "raw_copy_gbps": 400.0, "ratio": 0.25}
    assert [s["name"] for s in doc["steps"]] == ["tests", "raw_copy", "nccl_bench", "greedy"]
    assert doc["steps"][3]["reason"] == "vLLM for CUDA is not installed"


def test_one_gpu_report_has_no_ratio() -> None:
    steps = [Step("raw_copy", True, result={"gbps": 900.0}), Step("nccl_bench", False, "needs two GPUs")]
    assert report(Machine(1, True, False), steps, "")["bandwidth"]["ratio"] is None


def test_junit_counts_sort_passed_failed_and_skipped() -> None:
    xml = """<testsuites><testsuite>
      <testcase name="a"/><testcase name="b"><failure message="x"/></testcase>
      <testcase name="c"><skipped message="needs two GPUs"/></testcase><testcase name="d"><error/></testcase>
    </testsuite></testsuites>"""
    assert junit_counts(xml) == {"passed": 1, "failed": 2, "skipped": 1, "skip_reasons": ["c: needs two GPUs"]}
