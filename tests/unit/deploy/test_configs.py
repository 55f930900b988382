"""The pdserve configs deploy/ ships: the Ray job's and the ConfigMap of each rendered Kubernetes overlay.

Each must load as `pdserve serve` loads it (`config_from_dict`: unknown keys are errors), disaggregate over a
prefill and a decode pool that Ray places by custom resources of their own, let KV cross nodes, and keep
authentication, TLS and admission limits on: every shipped deployment renders with all three.
"""

from __future__ import annotations

import re

import pytest

from pdserve.config import config_from_dict
from tests.unit.deploy.shipped import DEPLOY, POOLS, Obj, shipped_configs


@pytest.fixture(params=sorted(shipped_configs()))
def shipped(request: pytest.FixtureRequest) -> tuple[str, Obj]:
    name = str(request.param)
    return name, shipped_configs()[name]


def test_every_shipped_config_loads(shipped: tuple[str, Obj]) -> None:
    name, data = shipped
    config = config_from_dict(data)
    assert config.workers.mode == "disaggregated", name
    for pool in POOLS:
        assert dict(getattr(config.workers, pool).resources) == data["workers"][pool]["resources"], name


def test_every_shipped_config_disaggregates_over_pools_of_their_own(shipped: tuple[str, Obj]) -> None:
    name, data = shipped
    workers = data["workers"]
    assert workers["mode"] == "disaggregated", name
    resources = {pool: set(workers[pool]["resources"]) for pool in POOLS}
    assert all(resources.values()), f"{name}: a pool without a custom resource may land on any node"
    assert not resources["prefill"] & resources["decode"], name
    assert data["ray"]["address"] == "auto", name  # joins the cluster it is deployed in


def test_every_shipped_config_keeps_authentication_and_admission_on(shipped: tuple[str, Obj]) -> None:
    name, data = shipped
    router = data["router"]
    assert router["host"] == "0.0.0.0", name
    assert router["auth"]["token_env"] == "PDSERVE_API_TOKEN", name
    assert router["max_outstanding"] > 0 and router["admission_queue"] > 0, name


def test_every_shipped_config_turns_tls_on_where_the_token_crosses_the_network(shipped: tuple[str, Obj]) -> None:
    name, data = shipped
    config = config_from_dict(data)
    assert config.router.auth.token_env and config.router.tls.enabled, name


def test_every_shipped_config_lets_kv_cross_nodes(shipped: tuple[str, Obj]) -> None:
    name, data = shipped
    transfer = data["transfer"]
    assert transfer["bind_host"] == "0.0.0.0", name
    # Between pods only tcp reaches; a Ray job's nodes may also host both pools (shm within a node).
    assert transfer["transport"] == ("auto" if name.startswith("ray/") else "tcp"), name


def test_the_gpu_config_asks_one_gpu_per_engine_and_the_cpu_configs_none(shipped: tuple[str, Obj]) -> None:
    name, data = shipped
    gpus = {pool: data["workers"][pool].get("gpus", 0) for pool in POOLS}
    assert gpus == ({"prefill": 1, "decode": 1} if "gpu" in name else {"prefill": 0, "decode": 0}), name


def test_the_ray_job_readme_starts_nodes_with_the_pools_resources() -> None:
    readme = (DEPLOY / "ray" / "README.md").read_text()
    flags = re.findall(r"--resources='(\{[^']*\})'", readme)
    data = shipped_configs()["ray/config.yaml"]
    for pool in POOLS:
        for resource in data["workers"][pool]["resources"]:
            assert any(f'"{resource}"' in flag for flag in flags), resource
