"""`make gpu-check`: what the NCCL transport does on a GPU machine, in one run of at most `BUDGET_S` seconds.

Steps, each skipped with its reason when it cannot run, each result one entry of `docs/benchmarks/nccl-gpu.json`:
1. install: the wheels in `--wheels` (cupy-cuda12x, nvidia-nccl-cu12, pytest; vLLM for CUDA if given), offline.
2. tests: `pytest tests/gpu`; counts of passed, failed and skipped tests (with the skip reasons).
3. bench: 16 MiB layers through the NCCL transport (`NcclLink` on `CupyBackend`, two processes, one GPU each)
   against a raw device-to-device copy on one GPU, side by side in this run; the ratio. NCCL refuses two ranks
   on one GPU, so on a one-GPU machine only the raw copy runs and the NCCL figure is null with that reason.
4. greedy: 1P1D with the nccl transport must stream, token for token, what one plain vLLM engine generates
   (tests/gpu, marker `greedy`); needs vLLM for CUDA and two GPUs.

The policy (`plan`, `report`) is pure and unit-tested; `main` is the shell that runs the steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BUDGET_S = 330.0  # under six minutes with room for the machine's own start
LAYER_BYTES = 16 << 20  # tests/gpu/test_nccl.py's layer: both sides of the ratio move the same size
SCHEMA = 1


@dataclass(frozen=True)
class Machine:
    gpus: int
    cupy: bool  # cupy with NCCL imports
    vllm_cuda: bool  # vLLM for CUDA imports


@dataclass
class Step:
    name: str
    run: bool
    reason: str = ""  # why it is skipped
    result: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def plan(machine: Machine) -> list[Step]:
    """Which steps can run on `machine`, and why the others cannot."""
    no_gpu = "no CUDA device" if machine.gpus < 1 else ("cupy with NCCL is not installed" if not machine.cupy else "")
    one_gpu = "NCCL refuses two ranks on one GPU: needs two GPUs" if machine.gpus < 2 else ""
    return [
        Step("tests", run=True),
        Step("raw_copy", run=not no_gpu, reason=no_gpu),
        Step("nccl_bench", run=not (no_gpu or one_gpu), reason=no_gpu or one_gpu),
        Step("greedy", run=machine.vllm_cuda and not (no_gpu or one_gpu),
             reason=no_gpu or one_gpu or ("" if machine.vllm_cuda else "vLLM for CUDA is not installed")),
    ]


def ratio(nccl_gbps: float | None, raw_gbps: float | None) -> float | None:
    return None if not nccl_gbps or not raw_gbps else round(nccl_gbps / raw_gbps, 3)


def report(machine: Machine, steps: list[Step], device: str) -> dict[str, Any]:
    """The JSON document: the machine, each step, and the bandwidth summary."""
    by = {s.name: s for s in steps}
    raw = by["raw_copy"].result.get("gbps") if "raw_copy" in by else None
    nccl = by["nccl_bench"].result.get("gbps") if "nccl_bench" in by else None
    return {
        "schema": SCHEMA, "device": device, "machine": asdict(machine), "layer_bytes": LAYER_BYTES,
        "bandwidth": {"nccl_gbps": nccl, "raw_copy_gbps": raw, "ratio": ratio(nccl, raw)},
        "steps": [asdict(s) for s in steps],
    }


def write(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def junit_counts(xml_text: str) -> dict[str, Any]:
    """passed/failed/skipped (and the skip reasons) from pytest's JUnit XML."""
    root = ET.fromstring(xml_text)
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0, "skip_reasons": []}
    for case in root.iter("testcase"):
        skipped = case.find("skipped")
        failed = case.find("failure") is not None or case.find("error") is not None
        if skipped is not None:
            counts["skipped"] += 1
            counts["skip_reasons"].append(f"{case.get('name')}: {skipped.get('message', '')}")
        elif failed:
            counts["failed"] += 1
        else:
            counts["passed"] += 1
    return counts


# ---- the shell ----


def _probe() -> Machine:
    gpus, cupy_ok, vllm_ok = 0, False, False
    try:
        import cupy
        from cupy.cuda import nccl

        gpus, cupy_ok = int(cupy.cuda.runtime.getDeviceCount()), bool(getattr(nccl, "available", False))
    except Exception:  # no cupy, no driver
        pass
    try:
        import torch
        import vllm  # noqa: F401

        vllm_ok = bool(torch.cuda.is_available())
    except Exception:
        pass
    return Machine(gpus, cupy_ok, vllm_ok)


def _install(wheels: Path) -> None:
    found = sorted(str(w) for w in wheels.glob("*.whl")) if wheels.is_dir() else []
    if found:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *found], check=True)


def _tests(left: float, junit: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "tests/gpu", f"--junitxml={junit}"]
    done = subprocess.run(cmd, timeout=left, capture_output=True, text=True)
    counts = junit_counts(junit.read_text()) if junit.exists() else {}
    return {"returncode": done.returncode, **counts, "tail": done.stdout[-2000:]}


def _raw_copy() -> dict[str, Any]:
    sys.path.insert(0, ".")
    from tests.gpu.test_nccl import raw_copy_gbps

    return {"gbps": round(raw_copy_gbps(LAYER_BYTES), 2)}


def _nccl_bench() -> dict[str, Any]:
    sys.path.insert(0, ".")
    from tests.gpu.test_nccl import nccl_gbps

    return {"gbps": round(nccl_gbps(LAYER_BYTES), 2)}


def _greedy(left: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "greedy", "tests/gpu"]
    done = subprocess.run(cmd, timeout=left, capture_output=True, text=True)
    return {"returncode": done.returncode, "tail": done.stdout[-2000:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--wheels", type=Path, default=Path(".whl"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/nccl-gpu.json"))
    args = parser.parse_args(argv)
    start = time.monotonic()
    _install(args.wheels)
    machine = _probe()
    runners = {"tests": lambda left: _tests(left, args.out.with_suffix(".junit.xml")),
               "raw_copy": lambda left: _raw_copy(), "nccl_bench": lambda left: _nccl_bench(), "greedy": _greedy}
    steps = plan(machine)
    for step in steps:
        left = BUDGET_S - (time.monotonic() - start)
        if step.run and left <= 10:
            step.run, step.reason = False, "the time budget ran out"
        if not step.run:
            continue
        began = time.monotonic()
        try:
            step.result = runners[step.name](left)
        except Exception as exc:  # a failed step is reported, the others still run
            step.result = {"error": f"{type(exc).__name__}: {exc}"}
        step.seconds = round(time.monotonic() - began, 1)
    device = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip() if machine.gpus else ""
    doc = report(machine, steps, device)
    write(args.out, doc)
    print(json.dumps(doc["bandwidth"]), json.dumps({s.name: s.reason or "ran" for s in steps}))
    failed = any(s.result.get("error") or s.result.get("returncode") for s in steps)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
