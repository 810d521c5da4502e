"""k8s/: every rendered manifest is valid (Kubernetes schemas, the RayService CRD schema), and the RayService
runs exactly the Serve configs of deploy/ with what they need from the pods."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.app.serve_env import SERVE_ENV
from tests.deploy.kustomize import render

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRD = ROOT.parent / "shared" / "schemas" / "ray.io_rayservices.yaml"
K8S_VERSION = "1.31.0"
# Which Serve config each kustomization embeds, and the GPUs each Ray pod must then have.
TREES = {
    "base": (K8S / "base", ROOT / "deploy" / "single-gpu-node.yaml"),
    "dev": (K8S / "overlays" / "dev", ROOT / "deploy" / "local-cpu.yaml"),
    "prod": (K8S / "overlays" / "prod", ROOT / "deploy" / "multi-node.yaml"),
}
APP_ENV = {"MODEL_DIR", "MINICPMO_REDIS_URL", "MINICPMO_API_KEYS"}


@pytest.fixture(scope="module", params=list(TREES))
def tree(request) -> tuple[str, list[dict]]:
    return request.param, render(TREES[request.param][0])


def _ray_service(objects: list[dict]) -> dict:
    (ray,) = [o for o in objects if o["kind"] == "RayService"]
    return ray


def _pod_templates(ray: dict) -> dict[str, dict]:
    cluster = ray["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates |= {g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}
    return templates


def _strict(schema: object) -> object:
    """The CRD schema with unknown fields forbidden wherever it lists the known ones (what `kubectl apply
    --validate=strict` does), so a misspelt field fails here instead of being dropped by the API server."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out and not out.get(
                "x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(v1["schema"]["openAPIV3Schema"])


def test_core_objects_match_kubernetes_schemas(tree):
    name, objects = tree
    core = [o for o in objects if o["kind"] != "RayService"]
    assert {o["kind"] for o in core} >= {"StatefulSet", "Service"}, name
    for obj in core:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_ray_pod_templates_are_valid_pods(tree):
    """KubeRay copies each template into a Pod: validate them as Pods with the Kubernetes schema."""
    name, objects = tree
    for group, template in _pod_templates(_ray_service(objects)).items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}-{group}", **template["metadata"]},
               "spec": template["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_rayservice_matches_crd_schema(tree, crd_schema):
    _, objects = tree
    jsonschema.validate(_ray_service(objects), crd_schema)


def test_strict_crd_schema_rejects_unknown_fields(tree, crd_schema):
    """The schema check is not vacuous: a misspelt field is an error."""
    _, objects = tree
    broken = copy.deepcopy(_ray_service(objects))
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(jsonschema.ValidationError, match="rayStartParam"):
        jsonschema.validate(broken, crd_schema)


def test_serve_config_is_embedded_verbatim(tree):
    name, objects = tree
    embedded = _ray_service(objects)["spec"]["serveConfigV2"]
    source = TREES[name][1]
    assert embedded == source.read_text(), (
        f"{name}: serveConfigV2 differs from {source.relative_to(ROOT)}; run `python k8s/sync_serve_configs.py`")


def test_ray_pods_get_the_app_environment_and_probes(tree):
    name, objects = tree
    for group, template in _pod_templates(_ray_service(objects)).items():
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert APP_ENV <= set(env), f"{name}/{group}"
        assert {k: env[k].get("value") for k in SERVE_ENV if k in env} == SERVE_ENV, f"{name}/{group}: Serve's env"
        assert env["MINICPMO_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "minicpmo-api-keys"
        assert container["readinessProbe"]["grpc"]["port"] == 9000
        assert "livenessProbe" in container
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == 9000 and ports["metrics"] == 8080
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8080"
        model_dir = env["MODEL_DIR"]["value"]
        (init,) = template["spec"]["initContainers"]
        assert model_dir in init["command"], f"{name}/{group}: init step must provide/check {model_dir}"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert model_dir.startswith(mounts["models"])


def test_head_has_no_gpus_and_workers_match_their_config(tree):
    name, objects = tree
    ray = _ray_service(objects)
    cluster = ray["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    serve = yaml.safe_load(ray["spec"]["serveConfigV2"])
    wants_gpus = any("num_gpus" in d.get("ray_actor_options", {}) for d in serve["applications"][0]["deployments"])
    for group in cluster["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        gpus = int(spec["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        assert (gpus > 0) == wants_gpus, f"{name}/{group['groupName']}"
        if gpus:
            assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])


def test_services_expose_grpc_metrics_and_redis(tree):
    name, objects = tree
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    ports = {p["name"]: p["port"] for p in services["minicpmo"]["spec"]["ports"]}
    assert ports == {"grpc": 9000, "metrics": 8080}
    ray = _ray_service(objects)
    for template in _pod_templates(ray).values():
        assert services["minicpmo"]["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    redis = [o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "minicpmo-redis"]
    args = redis[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"  # sessions survive a Redis restart
    assert redis[0]["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert services["minicpmo-redis"]["spec"]["ports"][0]["port"] == 6379


def test_overlay_specifics():
    dev, prod = render(TREES["dev"][0]), render(TREES["prod"][0])
    assert {o["metadata"]["namespace"] for o in dev} == {"minicpmo-dev"}
    assert {o["metadata"]["namespace"] for o in prod} == {"minicpmo"}
    # dev: CPU only, the tiny checkpoint made by an init container, no model volume, a dev key
    dev_kinds = {(o["kind"], o["metadata"]["name"]) for o in dev}
    assert ("PersistentVolumeClaim", "minicpmo-models") not in dev_kinds
    for template in _pod_templates(_ray_service(dev)).values():
        assert template["spec"]["initContainers"][0]["command"][:2] == ["minicpmo", "make-tiny-checkpoint"]
    (secret,) = [o for o in dev if o["kind"] == "Secret"]
    assert secret["stringData"]["MINICPMO_API_KEYS"]
    # prod: the Secret comes from outside git, the model volume is filled by a Job, images from the registry
    prod_kinds = {(o["kind"], o["metadata"]["name"]) for o in prod}
    assert ("Secret", "minicpmo-api-keys") not in prod_kinds
    assert ("PersistentVolumeClaim", "minicpmo-models") in prod_kinds and ("Job", "minicpmo-model-download") in prod_kinds
    images = {c["image"] for t in _pod_templates(_ray_service(prod)).values() for c in t["spec"]["containers"]}
    assert all(i.startswith("registry.example.com/") for i in images)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with built-in kustomize) is not installed")
@pytest.mark.parametrize("name", list(TREES))
def test_renderer_agrees_with_kubectl_kustomize(name):
    out = subprocess.run(["kubectl", "kustomize", str(TREES[name][0])], check=True, capture_output=True, text=True)
    theirs = sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=lambda o: (o["kind"], o["metadata"]["name"]))
    mine = sorted(render(TREES[name][0]), key=lambda o: (o["kind"], o["metadata"]["name"]))
    assert json.dumps(mine, sort_keys=True) == json.dumps(theirs, sort_keys=True)
