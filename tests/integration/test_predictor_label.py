"""The predictor pipeline end to end on the tiny model: label, interrupt, resume, train a head, evaluate it.

One engine serves both labelling passes: what resumes is the file, not the process. The scores of a head trained
on four random-model prompts mean nothing; the test checks that every stage runs and what each writes.
"""

import contextlib
import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections import Counter

import psutil
import pytest

from pdserve.cli import main as cli
from pdserve_tools.predictor.label import LabelConfig, engine, label, remaining
from pdserve_tools.predictor.store import read_labels

pytestmark = pytest.mark.integration

MAX_TOKENS = 16


def test_label_resume_train_and_eval(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    out = tmp_path / "labels.jsonl"
    # One prompt in the engine at a time: each finished prompt is replaced by the next one.
    config = LabelConfig(model=str(tiny_model), out=out, prompts=2, samples=2, batch=1, max_tokens=MAX_TOKENS,
                         max_prompt_tokens=512, kv_cache_gib=0.25)
    grown = dataclasses.replace(config, prompts=4)
    llm = engine(config)
    try:
        assert label(config, llm) == 2
        first = [r.id for r in read_labels(out)]
        with out.open("a") as f:
            f.write('{"id": "0123456789abcdef", "split": "tr')  # the batch in flight when the run stopped
        assert remaining(grown) == 2
        assert label(grown, llm) == 2
        assert label(grown, llm) == 0  # nothing left: a finished file is left alone
    finally:
        llm.llm_engine.engine_core.shutdown()

    records = read_labels(out)
    ids = [r.id for r in records]
    assert len(ids) == 4 == len(set(ids)) and ids[:2] == first
    for r in records:
        assert len(r.lengths) == 2 and all(1 <= n <= MAX_TOKENS for n in r.lengths)
        assert all(n == MAX_TOKENS for n, capped in zip(r.lengths, r.capped, strict=True) if capped)
        assert r.settings.model == tiny_model.name and r.settings.temperature == 1.0
        assert 1 <= r.prompt_tokens <= 512 and r.prompt
    with pytest.raises(ValueError, match="labelled with"):
        remaining(dataclasses.replace(grown, samples=3))  # other settings never mix into one file

    head = tmp_path / "head.pt"
    assert cli(["predictor", "train", "--data", str(out), "--out", str(head), "--epochs", "5"]) == 0
    assert 0 < head.stat().st_size < 1_000_000
    split = Counter(r.split for r in records).most_common(1)[0][0]  # four prompts may leave the test split empty
    report_file = tmp_path / "eval.json"
    assert cli(["predictor", "eval", "--data", str(out), "--head", str(head), "--split", split,
                "--json", str(report_file), "--cost-prompts", "4"]) == 0
    report = json.loads(report_file.read_text())
    assert set(report["results"]) == {"minilm", "prompt_length"}  # the head, named by its kind, and the baseline
    for scores in report["results"].values():
        assert {"kendall_tau", "mae_tokens", "within_50", "within_100", "p90_coverage", "p90_coverage_online",
                "cost_ms_p50"} <= set(scores)
        assert scores["prompts"] == sum(r.split == split for r in records)
        assert scores["samples"] == 2 * scores["prompts"]
        assert 0 <= scores["p90_coverage"] <= 1 and scores["cost_ms_p50"] > 0
    assert "Kendall tau" in capsys.readouterr().out


def test_a_batch_longer_than_one_engine_step(tiny_model, tmp_path, monkeypatch):
    """Seeded samples whose prompts do not all fit one engine step: vLLM-CPU fails a seeded request whose prompt
    is split across steps, so the labeller prefills every prompt whole."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    config = LabelConfig(model=str(tiny_model), out=tmp_path / "labels.jsonl", prompts=48, samples=4, batch=48,
                         max_tokens=2, max_prompt_tokens=1024, kv_cache_gib=0.5)
    llm = engine(config)
    try:
        assert label(config, llm) == 48
    finally:
        llm.llm_engine.engine_core.shutdown()
    records = read_labels(config.out)
    step = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    assert sum(r.prompt_tokens for r in records) * config.samples > step  # so some step could not take them all
    assert all(len(r.lengths) == 4 and all(1 <= n <= 2 for n in r.lengths) for r in records)


def _read_until(stream, marker: bytes, timeout: float) -> bytes:
    """What `stream` (a pipe) gave until `marker` appeared in it; fails after `timeout` seconds or at its end."""
    seen, deadline = b"", time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(stream.fileno(), 65536) if ready else b""
        assert chunk, f"no {marker!r} within {timeout} s; got: {seen[-2000:]!r}"
        seen += chunk
    return seen


def test_a_terminated_run_takes_its_engine_down(tiny_model, tmp_path):
    """SIGTERM (a scheduler stopping the job) mid-run: the labeller exits and no engine process outlives it."""
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    run = subprocess.Popen(
        [sys.executable, "-m", "pdserve.cli", "predictor", "label", "--model", str(tiny_model), "--out",
         str(tmp_path / "labels.jsonl"), "--prompts", "200", "--samples", "2", "--batch", "4", "--max-tokens", "512",
         "--max-prompt-tokens", "512", "--kv-cache-gib", "0.25"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    engine_processes: list[psutil.Process] = []
    try:
        _read_until(run.stderr, b"labelling:", timeout=300)  # the engine is up and labelling
        engine_processes = psutil.Process(run.pid).children(recursive=True)
        assert engine_processes
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=120) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(engine_processes, timeout=60)
        assert not alive, [p.info for p in alive]
    finally:
        for process in [run, *engine_processes]:  # a failed run must not leave its engine on the cores
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                process.kill()
        run.wait()
