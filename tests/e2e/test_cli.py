"""The `pdserve` command as a user runs it: model prepare, demo, serve + generate over TLS with the bearer token
(subprocesses)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_ENGINE

pytestmark = pytest.mark.integration

PDSERVE = [sys.executable, "-m", "pdserve.cli"]


def tiny_config(tmp_path: Path, model: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    router = {"port": 0, "http_port": 0, "metrics_port": 0}
    path.write_text(yaml.safe_dump({"engine": {"model": str(model), **TINY_ENGINE}, "router": router}))
    return path


def test_model_prepare_converts_once_and_reuses(tmp_path):
    env = {**os.environ, "PDSERVE_CACHE_DIR": str(tmp_path)}
    first = subprocess.run([*PDSERVE, "model", "prepare"], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    folder = Path(first.stdout.strip().splitlines()[-1])
    assert folder == tmp_path / "models" / "smollm2-135m-instruct"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (folder / "model.safetensors").stat().st_size > 400e6  # fp32 weights of 135M parameters
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = subprocess.run([*PDSERVE, "model", "prepare"], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and Path(again.stdout.strip().splitlines()[-1]) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_demo_streams_answers_with_timings_and_exits_0(tmp_path, tiny_model):
    run = subprocess.run([*PDSERVE, "demo", "--config", str(tiny_config(tmp_path, tiny_model))],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    # The embedded default is disaggregated 1P1D: each answer names both instances and breaks its time down.
    lines = re.findall(r"\[prefill-0 -> decode-0\] (\d+) tokens, finish=\w+, TTFT \d+ ms, TPOT [\d.]+ ms",
                       run.stdout)
    assert len(lines) == 3 and all(int(n) > 0 for n in lines)
    breakdowns = re.findall(r"router_queue [\d.]+ .*kv_transfer ([\d.]+) .*decode [\d.]+ +\(ms\)", run.stdout)
    assert len(breakdowns) == 3


def test_serve_then_generate_through_the_sdk_over_tls_with_the_token(tmp_path, tiny_model):
    from tests.pki import Authority

    authority = Authority(tmp_path, "ca")
    server_pair = authority.issue("server", server=True)
    config = yaml.safe_load(tiny_config(tmp_path, tiny_model).read_text())
    config["router"].update(tls={"cert_file": str(server_pair.cert), "key_file": str(server_pair.key)},
                            auth={"token_env": "PDSERVE_API_TOKEN"})
    (tmp_path / "secured.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PDSERVE_API_TOKEN": "s3cret-token", "MY_TOKEN": "s3cret-token"}
    server = subprocess.Popen([*PDSERVE, "serve", "--config", str(tmp_path / "secured.yaml")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        port = None
        for line in server.stdout:  # blocks until the server announces itself (or exits)
            if m := re.search(r"serving gRPC on [\d.]+:(\d+)", line):
                port = m.group(1)
                break
        assert port is not None, "the server exited before serving"

        def generate(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*PDSERVE, "generate", "Hello there", "--target", f"localhost:{port}", *extra],
                                  env=env, capture_output=True, text=True, timeout=120)

        secured = ("--ca-file", str(authority.pair.cert), "--token-env", "MY_TOKEN")
        gen = generate(*secured, "--max-tokens", "5")
        assert gen.returncode == 0, gen.stderr
        assert re.search(r"\[\d+ tokens, (stop|length), TTFT \d+ ms", gen.stderr)
        bad = generate(*secured, "--max-tokens", "0")
        assert bad.returncode == 1 and "INVALID_ARGUMENT: sampling.max_tokens must be between 1" in bad.stderr
        no_token = generate("--ca-file", str(authority.pair.cert))
        assert no_token.returncode == 1 and "UNAUTHENTICATED" in no_token.stderr
        unset = generate("--ca-file", str(authority.pair.cert), "--token-env", "NOT_SET_ANYWHERE")
        assert unset.returncode == 2 and "NOT_SET_ANYWHERE: that environment variable is not set" in unset.stderr
    finally:
        server.terminate()
        assert server.wait(timeout=120) == 0

