"""The tools' offline engine against the served one: the same engine arguments from one `EngineConfig`, captured
from stand-ins for vLLM's constructors (no engine starts)."""

import dataclasses
import json
import os
import sys
import types

import pytest

from pdserve_tools.engine import offline_engine
from worker.config import EngineConfig
from worker.engine import Engine

SERVING_ONLY = {"enable_log_requests", "kv_transfer_config", "worker_extension_cls"}  # the KV connector, logging
OFFLINE_ONLY = {"enable_chunked_prefill"}  # every prompt prefilled whole
CONFIG = EngineConfig(max_model_len=512, max_num_seqs=8, max_num_batched_tokens=1024, kv_cache_gib=0.5,
                      block_size=64, seed=3, compile=True)


class Captured(Exception):
    def __init__(self, **kwargs: object) -> None:
        self.kwargs = kwargs


def _fake(monkeypatch, name: str, **attrs: object) -> None:
    monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))


def _raise(**kwargs: object) -> None:
    raise Captured(**kwargs)


@pytest.fixture
def model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({}))
    return tmp_path


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    """The factory sets these; monkeypatch puts them back afterwards."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")


def _served(monkeypatch, model) -> dict[str, object]:
    _fake(monkeypatch, "vllm.config", KVTransferConfig=None)
    _fake(monkeypatch, "vllm.engine.arg_utils", AsyncEngineArgs=_raise)
    _fake(monkeypatch, "vllm.v1.engine.async_llm", AsyncLLM=None)
    with pytest.raises(Captured) as served:
        Engine(CONFIG, model)
    return served.value.kwargs


def _offline(monkeypatch, model, **options: object) -> dict[str, object]:
    _fake(monkeypatch, "vllm", LLM=_raise)
    with pytest.raises(Captured) as offline:
        offline_engine(dataclasses.replace(CONFIG, model=str(model)), **options)
    return offline.value.kwargs


def test_the_offline_engine_takes_the_served_engines_arguments(monkeypatch, model):
    served, offline = _served(monkeypatch, model), _offline(monkeypatch, model, cores={0})
    assert {k: v for k, v in served.items() if k not in SERVING_ONLY} == {
        k: v for k, v in offline.items() if k not in OFFLINE_ONLY}
    assert offline["enforce_eager"] is False and offline["enable_chunked_prefill"] is False
    assert offline["enable_prefix_caching"] is None  # vLLM's default, as served
    assert _offline(monkeypatch, model, prefix_caching=False)["enable_prefix_caching"] is False


def test_the_offline_engine_binds_threads_as_a_served_instance(monkeypatch, model):
    _offline(monkeypatch, model, cores={0})
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0" and os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1")
    _offline(monkeypatch, model)  # no cores: the environment's binding stands
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "1"


def test_the_offline_engine_refuses_cores_this_process_may_not_use(monkeypatch, model):
    with pytest.raises(ValueError, match="may run on"):
        _offline(monkeypatch, model, cores={10**6})
