"""The Kubernetes manifests against the schemas the API server enforces.

Every rendered object validates against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: an unknown
field is an error). The ray.io objects validate against KubeRay's own CRD schemas, from the folder that
PDSERVE_KUBERAY_CRDS names (`make test` sets it to ../shared/kuberay-crds, KubeRay v1.7.0's CRDs, when that
folder exists; no PyPI or npm package ships them). Those checks are strict too: a CRD's structural schema leaves
`additionalProperties` out, which JSON Schema reads as "anything else goes", while the API server rejects unknown
fields (kubectl's default server-side field validation), so every object schema that lists `properties` and
neither `additionalProperties` nor `x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false`.
Without the CRDs the KubeRay checks skip, except under CI (the `CI` variable set), where they fail.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.unit.deploy.shipped import OVERLAYS, Obj, cluster, one, pod_templates, renamed, render, set_at

# The oldest Kubernetes the manifests are meant for (gRPC probes are GA since 1.27), and the newest schemas.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
EXPECTED_OBJECTS = {
    ("Namespace", "pdserve"), ("ConfigMap", "pdserve-config"), ("Service", "pdserve"),
    ("PersistentVolumeClaim", "pdserve-model-cache"), ("PodDisruptionBudget", "pdserve-head"),
    ("PodDisruptionBudget", "pdserve-workers"), ("NetworkPolicy", "pdserve-ray-head"),
    ("NetworkPolicy", "pdserve-ray-workers"), ("NetworkPolicy", "pdserve-kv"), ("NetworkPolicy", "pdserve-router"),
    ("RayCluster", "pdserve"),
}
CRDS_ENV = "PDSERVE_KUBERAY_CRDS"


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- Kubernetes schemas -------------------------------------------------------------------------------------


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
    "probe period as text": (("RayCluster", "pdserve"), ("spec", "headGroupSpec", "template", "spec",
                             "containers", 0, "startupProbe", "periodSeconds"), "ten"),
    "misspelled container field": (("RayCluster", "pdserve"), ("spec", "workerGroupSpecs", 1, "template", "spec",
                                   "containers", 0, "resource"), {"limits": {"cpu": "1"}}),
    "network policy port as a name list": (("NetworkPolicy", "pdserve-kv"), ("spec", "ingress", 0, "ports"),
                                           ["pdserve-kv"]),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_the_validator_rejects_a_broken_manifest(breakage: str) -> None:
    (kind, name), path, value = BREAKAGES[breakage]
    obj = one(render("cpu"), kind, name)
    assert schema_errors(obj, K8S_VERSIONS[-1]) == []
    assert schema_errors(set_at(obj, path, value), K8S_VERSIONS[-1]) != []


# --- KubeRay's CRDs -----------------------------------------------------------------------------------------


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def crd_folder() -> Path:
    """The folder of KubeRay CRD files; skips without one, and fails without one under CI."""
    value = os.environ.get(CRDS_ENV, "")
    if not value:
        why = (f"{CRDS_ENV} is not set: set it to a folder of KubeRay CRD files (`make test` sets it to "
               "../shared/kuberay-crds when that folder exists)")
        if in_ci():
            pytest.fail(f"CI must validate the manifests against KubeRay's CRDs, but {why}")
        pytest.skip(why)
    folder = Path(value)
    assert folder.is_dir(), f"{CRDS_ENV}={value} is not a folder"
    return folder


@cache
def _crd_schemas(folder: Path) -> dict[str, Obj]:
    """openAPIV3Schema by "group/version/Kind" from the CRD files in `folder`."""
    schemas = {}
    for path in sorted(folder.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition" and doc["spec"]["group"] == "ray.io":
                for version in doc["spec"]["versions"]:
                    schemas[f"ray.io/{version['name']}/{doc['spec']['names']['kind']}"] = version["schema"][
                        "openAPIV3Schema"]
    assert schemas, f"no ray.io CustomResourceDefinition in {folder}"
    return schemas


def strict(schema: Obj) -> Obj:
    """`schema` with `additionalProperties: false` on every object schema that lists `properties` and leaves
    unknown fields neither allowed nor preserved; walks subschemas only (a property named "properties" is data)."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    return out


@cache
def _validator(folder: Path, key: str, strict_schema: bool) -> Any:
    schema = _crd_schemas(folder)[key]
    # A CRD's structural schema is OpenAPI 3.0, a dialect of JSON Schema draft 4 (x-kubernetes-* are ignored).
    return jsonschema.Draft4Validator(strict(schema) if strict_schema else schema)


def crd_errors(obj: Obj, strict_schema: bool = True) -> list[str]:
    validator = _validator(crd_folder(), f"{obj['apiVersion']}/{obj['kind']}", strict_schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(obj)]


def test_kuberay_objects_validate_strictly_against_the_kuberay_crds(overlay: str) -> None:
    objs = [o for o in render(overlay) if o["apiVersion"].startswith("ray.io/")]
    assert objs
    assert [e for o in objs for e in crd_errors(o)] == []


SPEC = ("spec",)
WORKER = ("spec", "workerGroupSpecs", 0)
TYPOS = {
    "workerGroupSpec": (SPEC, "workerGroupSpecs", "workerGroupSpec"),
    "rayStartParam": (WORKER, "rayStartParams", "rayStartParam"),
    "resource (worker group)": (WORKER, "resources", "resource"),
    "authOption": (SPEC, "authOptions", "authOption"),
    "headGroupSpec rayStartParam": (("spec", "headGroupSpec"), "rayStartParams", "rayStartParam"),
    "enableInTreeAutoScaling": (SPEC, "enableInTreeAutoscaling", "enableInTreeAutoScaling"),
}


@pytest.mark.parametrize("typo", sorted(TYPOS))
def test_a_misspelt_kuberay_field_fails_validation(typo: str) -> None:
    at, right, wrong = TYPOS[typo]
    broken = renamed(cluster(render("cpu")), (*at, right), wrong)
    errors = crd_errors(broken)
    assert any(f"'{wrong}' was unexpected" in e for e in errors), errors
    # The CRD as written lets the typo through: strictness is what catches it.
    assert crd_errors(broken, strict_schema=False) == []


def test_the_crd_validator_rejects_worker_replicas_as_text() -> None:
    ray_cluster = cluster(render("cpu"))
    assert crd_errors(set_at(ray_cluster, (*WORKER, "replicas"), "two")) != []


def test_strictness_keeps_free_form_maps_free() -> None:
    """rayStartParams, group resources and pod labels are maps of any keys: strictness must not close them."""
    ray_cluster = set_at(cluster(render("cpu")), (*WORKER, "rayStartParams"), {"any-ray-start-flag": "1"})
    ray_cluster = set_at(ray_cluster, (*WORKER, "resources"), {"some-custom-resource": "2"})
    ray_cluster = set_at(ray_cluster, (*WORKER, "template", "metadata", "labels", "example.com/any"), "x")
    assert crd_errors(ray_cluster) == []


def test_strict_adds_additional_properties_false_only_where_unknown_fields_are_not_allowed() -> None:
    schema = {"type": "object", "properties": {
        "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
        "preserved": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                      "properties": {"a": {"type": "string"}}},
        "list": {"type": "array", "items": {"type": "object", "properties": {"b": {"type": "integer"}}}},
        "properties": {"type": "object", "properties": {"c": {"type": "string"}}},
    }}
    out = strict(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["closed"]["additionalProperties"] is False
    assert out["properties"]["map"]["additionalProperties"] == {"type": "string"}
    assert "additionalProperties" not in out["properties"]["preserved"]
    assert out["properties"]["list"]["items"]["additionalProperties"] is False
    assert out["properties"]["properties"]["additionalProperties"] is False
    assert schema["properties"]["closed"] == {"type": "object", "properties": {"a": {"type": "string"}}}  # a copy


def test_without_the_crds_the_kuberay_checks_skip_but_fail_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CRDS_ENV, raising=False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        crd_folder()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must validate"):
        crd_folder()
