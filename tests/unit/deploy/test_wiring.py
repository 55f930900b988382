"""The Kubernetes manifests' wiring: the parts must agree with each other and with the pdserve config.

Probes, ports, selectors, the NetworkPolicies' allow-list (evaluated pod pair by pod pair), volumes, secrets,
security contexts, image tags, disruption budgets, and the two worker groups against the config's two pools.
The rules KubeRay enforces in its controller rather than in its CRD schema are checked here too.
"""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.unit.deploy.shipped import (
    CONFIG_PATH,
    OVERLAYS,
    POOLS,
    SECRET,
    Obj,
    cluster,
    config_data,
    containers,
    cpus,
    groups,
    matches,
    one,
    pod_templates,
    render,
)

# rayStartParams that KubeRay refuses beside a group's `resources` (its validateRayGroupResources).
RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
IMAGE = "ghcr.io/pdserve/pdserve"


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def head_container(objs: tuple[Obj, ...]) -> Obj:
    container: Obj = pod_templates(cluster(objs))["head"]["spec"]["containers"][0]
    return container


def ports_of(container: Obj) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


# --- The head and the router --------------------------------------------------------------------------------


def test_the_head_starts_ray_then_serves_the_mounted_config(overlay: str) -> None:
    objs = render(overlay)
    head = pod_templates(cluster(objs))["head"]
    assert head["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    container = head["spec"]["containers"][0]
    script = [line.strip() for line in container["args"][0].splitlines() if line.strip()]
    assert any("KUBERAY_GEN_RAY_START_CMD" in line for line in script)
    assert script[-1] == f"exec python -m pdserve.cli serve --config {CONFIG_PATH}"
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(Path(CONFIG_PATH).parent))
    volume = next(v for v in head["spec"]["volumes"] if v["name"] == mount["name"])
    assert "config.yaml" in one(objs, "ConfigMap", volume["configMap"]["name"])["data"]
    # The overwrite annotation sits on the head's template only: on the RayCluster it would reach the workers.
    assert "ray.io/overwrite-container-cmd" not in cluster(objs)["metadata"].get("annotations", {})
    for group in groups(objs).values():
        assert "ray.io/overwrite-container-cmd" not in group["template"]["metadata"].get("annotations", {})


def test_the_head_keeps_kuberays_probes_and_starts_once_the_router_serves(overlay: str) -> None:
    objs = render(overlay)
    router = config_data(objs)["router"]
    container = head_container(objs)
    # KubeRay adds its own readiness and liveness probes (raylet and GCS health) only where the template has none.
    assert "readinessProbe" not in container and "livenessProbe" not in container
    probe = container["startupProbe"]
    # Over HTTPS on the HTTP frontend, which serves once the router does (the kubelet's gRPC probe has no TLS).
    assert router["tls"] and probe["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTPS"}
    assert ports_of(container)["http"] == router["http_port"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 30 * 60  # model preparation and engine starts


def test_ports_and_service_reach_the_router(overlay: str) -> None:
    objs = render(overlay)
    router = config_data(objs)["router"]
    assert router["host"] == "0.0.0.0"
    ports = ports_of(head_container(objs))
    expected = (router["port"], router["http_port"], router["metrics_port"])
    assert (ports["grpc"], ports["http"], ports["pdserve-metrics"]) == expected
    service = one(objs, "Service", "pdserve")
    assert {p["port"]: ports[p["targetPort"]] for p in service["spec"]["ports"]} == {
        50051: router["port"], 8000: router["http_port"], 9400: router["metrics_port"]}


def test_tls_is_on_with_the_certificate_secret_mounted_where_the_config_reads_it(overlay: str) -> None:
    objs = render(overlay)
    head = pod_templates(cluster(objs))["head"]
    container = head["spec"]["containers"][0]
    volume = next(v for v in head["spec"]["volumes"] if v.get("secret", {}).get("secretName") == "pdserve-tls")
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    assert not mount["mountPath"].startswith(str(Path(CONFIG_PATH).parent) + "/")  # not inside the config mount
    tls = config_data(objs)["router"]["tls"]
    assert Path(tls["cert_file"]) == Path(mount["mountPath"]) / "tls.crt"
    assert Path(tls["key_file"]) == Path(mount["mountPath"]) / "tls.key"


# --- The worker groups against the pools --------------------------------------------------------------------


def test_two_worker_groups_advertise_distinct_ray_resources(overlay: str) -> None:
    found = groups(render(overlay))
    assert set(found) == set(POOLS)
    resources = {name: set(g["resources"]) for name, g in found.items()}
    assert all(len(names) == 1 for names in resources.values()), resources
    assert not resources["prefill"] & resources["decode"]
    for name, group in found.items():
        labels = group["template"]["metadata"]["labels"]
        assert labels["pdserve.io/pool"] == name and labels["app.kubernetes.io/component"] == "worker"
        # KubeRay refuses a group with resources both here and in rayStartParams, and `labels` in rayStartParams.
        assert not set(group.get("rayStartParams", {})) & {*RESOURCE_PARAMS, "labels"}, name


def test_each_pool_fills_its_own_worker_group(overlay: str) -> None:
    objs = render(overlay)
    workers = config_data(objs)["workers"]
    assert workers["mode"] == "disaggregated"
    assert cluster(objs)["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no engine on the head
    for name, group in groups(objs).items():
        pool = workers[name]
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"] == pool["instances"], name
        assert {k: float(v) for k, v in group["resources"].items()} == {
            k: float(v) for k, v in pool["resources"].items()}, name
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert cpus(limits["cpu"]) == pool["cpus"], name  # one engine instance fills one worker pod
        assert float(limits.get("nvidia.com/gpu", 0)) == float(pool.get("gpus", 0)), name


def test_the_cluster_runs_the_pinned_ray_with_token_authentication(overlay: str) -> None:
    spec = cluster(render(overlay))["spec"]
    assert spec["rayVersion"] == version("ray")
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is False


# --- Network ------------------------------------------------------------------------------------------------


def allowed_ports(objs: tuple[Obj, ...], src: dict[str, str], dst: dict[str, str]) -> set[int] | None:
    """The ports a pod labelled `src` (in the namespace) may connect to on a pod labelled `dst`, by the ingress
    NetworkPolicies: None for every port, an empty set for none."""
    policies = [o for o in objs
                if o["kind"] == "NetworkPolicy" and matches(o["spec"]["podSelector"]["matchLabels"], dst)]
    assert policies, f"no NetworkPolicy selects {dst}: all traffic would be let in"
    ports: set[int] = set()
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            if peers is not None and not any("namespaceSelector" not in peer and "podSelector" in peer and matches(
                    peer["podSelector"].get("matchLabels", {}), src) for peer in peers):
                continue
            if "ports" not in rule:
                return None
            ports |= {p["port"] for p in rule["ports"]}
    return ports


def test_between_worker_pods_only_the_kv_stream_flows(overlay: str) -> None:
    objs = render(overlay)
    config = config_data(objs)
    kv_port, channel_port = config["transfer"]["kv_port"], config["workers"]["channel_port"]
    labels = {role.removeprefix("worker:"): t["metadata"]["labels"] for role, t in pod_templates(cluster(objs)).items()}
    assert set(labels) == {"head", *POOLS}
    stranger = {"app.kubernetes.io/name": "something-else"}

    def allowed(src: str, dst: str) -> set[int] | None:
        return allowed_ports(objs, labels.get(src, stranger), labels[dst])

    assert allowed("prefill", "decode") == {kv_port}
    for src, dst in (("decode", "prefill"), ("prefill", "prefill"), ("decode", "decode")):
        assert allowed(src, dst) == set(), (src, dst)
    for pool in POOLS:  # Ray's control plane and the router's request channels (workers.channel_port)
        assert allowed("head", pool) is None and allowed(pool, "head") is None
        assert allowed("stranger", pool) == set()
    router = config["router"]
    assert allowed("stranger", "head") == {router["port"], router["http_port"]}
    decode = ports_of(groups(objs)["decode"]["template"]["spec"]["containers"][0])
    assert decode["pdserve-kv"] == kv_port
    for name, group in groups(objs).items():
        assert ports_of(group["template"]["spec"]["containers"][0])["pdserve-channel"] == channel_port, name


def test_selectors_pick_the_pods_they_mean(overlay: str) -> None:
    objs = render(overlay)
    labels = {role: t["metadata"]["labels"] for role, t in pod_templates(cluster(objs)).items()}
    workers = {role for role in labels if role.startswith("worker:")}
    assert workers == {f"worker:{pool}" for pool in POOLS}

    def picked(selector: dict[str, str]) -> set[str]:
        return {role for role, pod_labels in labels.items() if matches(selector, pod_labels)}

    assert picked(one(objs, "Service", "pdserve")["spec"]["selector"]) == {"head"}
    assert picked(one(objs, "PodDisruptionBudget", "pdserve-head")["spec"]["selector"]["matchLabels"]) == {"head"}
    assert picked(one(objs, "PodDisruptionBudget", "pdserve-workers")["spec"]["selector"]["matchLabels"]) == workers
    assert picked(one(objs, "NetworkPolicy", "pdserve-ray-head")["spec"]["podSelector"]["matchLabels"]) == {"head"}
    assert picked(one(objs, "NetworkPolicy", "pdserve-ray-workers")["spec"]["podSelector"]["matchLabels"]) == workers
    assert picked(one(objs, "NetworkPolicy", "pdserve-kv")["spec"]["podSelector"]["matchLabels"]) == {
        "worker:decode"}
    public = one(objs, "NetworkPolicy", "pdserve-router")["spec"]
    assert picked(public["podSelector"]["matchLabels"]) == {"head"}
    assert {p["port"] for rule in public["ingress"] for p in rule["ports"]} == {50051, 8000, 9400}


def test_no_disruption_budget_blocks_a_drain(overlay: str) -> None:
    objs = render(overlay)
    for name in ("pdserve-head", "pdserve-workers"):
        spec = one(objs, "PodDisruptionBudget", name)["spec"]
        # One head: minAvailable 1 would refuse every eviction. Broken pods are always evictable.
        assert spec.get("minAvailable", 0) == 0 and spec["maxUnavailable"] >= 1, name
        assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow", name
    assert one(objs, "PodDisruptionBudget", "pdserve-workers")["spec"]["maxUnavailable"] == 1  # one engine at a time


# --- Volumes, secrets, security -----------------------------------------------------------------------------


def test_the_head_writes_the_model_cache_and_the_workers_only_read_it(overlay: str) -> None:
    objs = render(overlay)
    claim = one(objs, "PersistentVolumeClaim", "pdserve-model-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for role, template, container in containers(objs):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert set(mounts) <= set(volumes), role
        (cache,) = [n for n, v in volumes.items()
                    if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert mounts[cache]["mountPath"] == env["PDSERVE_CACHE_DIR"], role
        read_only = role != "head"
        assert mounts[cache].get("readOnly", False) is read_only, role
        assert volumes[cache]["persistentVolumeClaim"].get("readOnly", False) is read_only, role


def test_every_container_runs_unprivileged_on_a_read_only_root(overlay: str) -> None:
    for role, template, container in containers(render(overlay)):
        pod = template["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["seccompProfile"]["type"] == "RuntimeDefault", role
        assert template["spec"]["automountServiceAccountToken"] is False, role
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, role
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"], role
        # What must stay writable (Ray's session in /tmp/ray, HOME's caches, /dev/shm) is an emptyDir.
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        writable = {m["mountPath"] for m in container["volumeMounts"]
                    if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]}
        assert {"/tmp", "/dev/shm"} <= writable, role
        home = next(e["value"] for e in container["env"] if e["name"] == "HOME")
        assert any(Path(home).is_relative_to(w) for w in writable), role


def test_secrets_are_only_referenced_never_written(overlay: str) -> None:
    objs = render(overlay)
    assert not [o for o in objs if o["kind"] == "Secret"]
    wanted = {"head": {"PDSERVE_KV_SECRET", "PDSERVE_API_TOKEN"}}
    token_env = config_data(objs)["router"]["auth"]["token_env"]
    for role, _, container in containers(objs):
        referenced = set()
        for env in container["env"]:
            if re.search("SECRET|TOKEN|PASSWORD|KEY", env["name"]):
                assert "value" not in env, f"{role}: {env['name']} is written in the manifest"
                assert env["valueFrom"]["secretKeyRef"]["name"] == SECRET
                referenced.add(env["name"])
        assert wanted.get(role, set()) <= referenced, role
        assert (token_env in referenced) is (role == "head"), role  # the API token reaches the router only


def test_every_container_requests_and_limits_cpu_and_memory(overlay: str) -> None:
    for role, _, container in containers(render(overlay)):
        for side in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][side]), f"{role} {side}"


def test_images_carry_a_version_tag(overlay: str) -> None:
    images = {c["image"] for _, _, c in containers(render(overlay))}
    assert images == {f"{IMAGE}:{version('pdserve')}-{overlay}"}


def test_the_gpu_overlay_gives_each_engine_pod_a_gpu_and_tolerates_the_gpu_taint() -> None:
    for role, template, container in containers(render("gpu")):
        if role == "head":
            assert "nvidia.com/gpu" not in container["resources"]["limits"]
            continue
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1", role
        assert container["resources"]["requests"]["nvidia.com/gpu"] == "1", role
        assert "nvidia.com/gpu" in {t["key"] for t in template["spec"]["tolerations"]}, role


def test_the_cpu_overlay_asks_for_no_gpu() -> None:
    assert "nvidia.com/gpu" not in repr(render("cpu"))
