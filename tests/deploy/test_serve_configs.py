"""deploy/*.yaml: valid Ray Serve configs that name the code's real import path, deployments, constructor
arguments and gRPC servicers, with GPU shares that fit the nodes they are written for."""

from __future__ import annotations

import importlib
import inspect
import json
import math
from pathlib import Path

import pytest
import yaml
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.build_app import build_app
from ray.serve.schema import ServeDeploySchema

from services.app.args import AppArgs, DeploymentSpec
from services.app.builder import GRPC_SERVICER_FUNCTIONS
from services.common.checkpoint_layout import official_shapes, service_of
from services.common.config import real_config
from tests.deploy.kustomize import render

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {p.stem: p for p in sorted((ROOT / "deploy").glob("*.yaml"))}
# Environment-specific values come from the environment, never from a config.
ENVIRONMENT_ARGS = {"api_keys", "redis_url"}
PIPELINE = {"Gateway", "VisionEncoder", "AudioEncoder", "LLMCore", "TTSDecoder"}
GPU_GB = 80e9
CONTEXT_AND_SLACK_BYTES = 3e9  # CUDA context + caching-allocator fragmentation per GPU process


def _load(name: str) -> dict:
    return yaml.safe_load(CONFIGS[name].read_text())


def _app(config: dict) -> dict:
    (app,) = config["applications"]
    return app


def _deployments(config: dict) -> dict[str, dict]:
    return {d["name"]: d for d in _app(config)["deployments"]}


def _import(path: str):
    module, _, attr = path.replace(":", ".").rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_all_three_configs_exist():
    assert {"local-cpu", "single-gpu-node", "multi-node"} <= set(CONFIGS)


@pytest.fixture(params=sorted(CONFIGS))
def config_name(request) -> str:
    return request.param


def test_valid_serve_schema(config_name):
    config = _load(config_name)
    ServeDeploySchema.model_validate(config)
    assert config["grpc_options"]["port"] == 9000


def test_grpc_servicer_functions_exist(config_name):
    functions = _load(config_name)["grpc_options"]["grpc_servicer_functions"]
    assert functions == GRPC_SERVICER_FUNCTIONS
    for path in functions:
        assert callable(_import(path)), path


def test_builder_arguments_are_known(config_name):
    args = AppArgs.model_validate(_app(_load(config_name))["args"])  # the typed schema refuses unknown ones
    assert args.device in ("cpu", "cuda")
    assert not ENVIRONMENT_ARGS & args.model_fields_set, "secrets and endpoints come from the environment"


def test_serve_overrides_are_deployment_options_of_the_schema(config_name):
    """What a config's `deployments:` list sets over the app's defaults is an option the schema knows, so the
    defaults (services.app.args.DEFAULTS) and the configs describe the same knobs."""
    for name, override in _deployments(_load(config_name)).items():
        DeploymentSpec.model_validate({k: v for k, v in override.items() if k != "name"})


@pytest.fixture
def built(config_name, monkeypatch, golden):
    """Build the application the way `serve deploy` does (import path + args), without starting Ray."""
    monkeypatch.setenv("MODEL_DIR", str(golden.checkpoint))
    monkeypatch.setenv("MINICPMO_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("MINICPMO_API_KEYS", "test-key")
    app_config = _app(_load(config_name))
    builder = _import(app_config["import_path"])  # fails clearly if the builder is missing or broken
    app = call_user_app_builder_with_args_if_necessary(builder, app_config["args"])
    return build_app(app, name=app_config["name"])


def test_config_names_exactly_the_app_deployments(config_name, built):
    config = _load(config_name)
    code = {d.name: d for d in built.deployments}
    expected = PIPELINE | ({"Vocoder"} if _app(config)["args"].get("separate_vocoder") else set())
    assert set(code) == expected
    assert built.ingress_deployment_name == "Gateway"
    # Serve refuses a config that overrides a deployment the app lacks; every deployment is configured here
    assert set(_deployments(config)) == set(code)


def test_init_kwargs_match_constructors(config_name, built):
    code = {d.name: d for d in built.deployments}
    for name, override in (_app(_load(config_name))["args"].get("deployments") or {}).items():
        assert name in code, name
        init = inspect.signature(code[name].func_or_class.__init__)
        init.bind_partial(None, **override.get("init_kwargs", {}))  # TypeError names an unknown argument


def test_every_deployment_sets_resources_scaling_and_health(config_name):
    for name, d in _deployments(_load(config_name)).items():
        assert "num_cpus" in d["ray_actor_options"], name
        scaling = d["autoscaling_config"]
        assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"], name
        assert d["max_ongoing_requests"] > 0 and d["health_check_period_s"] > 0 and d["health_check_timeout_s"] > 0
        gpus = d["ray_actor_options"].get("num_gpus", 0)
        assert (gpus > 0) == (_app(_load(config_name))["args"]["device"] == "cuda" and name != "Gateway"), name


def test_local_cpu_fits_two_cores():
    deployments = _deployments(_load("local-cpu"))
    assert sum(d["ray_actor_options"]["num_cpus"] * d["autoscaling_config"]["min_replicas"]
               for d in deployments.values()) <= 2


def _bytes(service: str) -> float:
    """bf16 weight bytes of one service of the real model."""
    return 2 * sum(math.prod(s) for k, s in official_shapes(real_config()).items() if service_of(k) == service)


def _llm_fits(share: float, init_kwargs: dict) -> None:
    llm = real_config().llm
    kv_per_token = 2 * llm.num_hidden_layers * llm.num_key_value_heads * llm.head_dim * 2
    logits = init_kwargs["max_batch_tokens"] * llm.vocab_size * 4  # fp32 logits of a full batch, at worst
    need = _bytes("llm") + init_kwargs["kv_budget_tokens"] * kv_per_token + logits + CONTEXT_AND_SLACK_BYTES
    assert need <= share * GPU_GB, f"LLMCore needs {need / 1e9:.1f} GB of its {share * GPU_GB / 1e9:.0f} GB"


def test_single_gpu_node_adds_up_on_one_80gb_gpu():
    config = _load("single-gpu-node")
    deployments = _deployments(config)
    (ray,) = [o for o in render(ROOT / "k8s" / "base") if o["kind"] == "RayService"]
    (worker,) = ray["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    node_gpus = int(worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert node_gpus == 1
    booked = sum(d["ray_actor_options"].get("num_gpus", 0) * d["autoscaling_config"]["max_replicas"]
                 for d in deployments.values())
    assert booked <= node_gpus + 1e-9
    _llm_fits(deployments["LLMCore"]["ray_actor_options"]["num_gpus"],
              _app(config)["args"]["deployments"]["LLMCore"]["init_kwargs"])
    for name, service in (("VisionEncoder", "vision"), ("AudioEncoder", "audio"), ("TTSDecoder", "tts")):
        assert _bytes(service) < deployments[name]["ray_actor_options"]["num_gpus"] * GPU_GB / 4, name


def _custom_resources(group: dict) -> dict[str, float]:
    raw = group["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}  # KubeRay's '"{\"name\": n}"' quoting


def test_multi_node_adds_up_per_8x80gb_node():
    config = _load("multi-node")
    deployments = _deployments(config)
    (ray,) = [o for o in render(ROOT / "k8s" / "overlays" / "prod") if o["kind"] == "RayService"]
    assert ray["spec"]["serveConfigV2"] == CONFIGS["multi-node"].read_text()
    groups = ray["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for group in groups:
        gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus == 8, group["groupName"]
        ((resource, capacity),) = _custom_resources(group).items()
        users = {n: d["ray_actor_options"] for n, d in deployments.items()
                 if resource in d["ray_actor_options"].get("resources", {})}
        assert users, f"no deployment is placed on the {group['groupName']} nodes"
        for name, opts in users.items():
            # a replica takes as much of the node's custom resource as of its GPUs: whatever mix the
            # scheduler packs onto a node, the GPU shares add up to at most the node's GPUs
            assert opts["num_gpus"] / opts["resources"][resource] <= gpus / capacity, name
    placed = {n for n, d in deployments.items() if d["ray_actor_options"].get("resources")}
    assert placed == {n for n, d in deployments.items() if d["ray_actor_options"].get("num_gpus")}
    assert deployments["LLMCore"]["ray_actor_options"]["num_gpus"] == 1
    _llm_fits(1.0, _app(config)["args"]["deployments"]["LLMCore"]["init_kwargs"])
    media = [d["ray_actor_options"]["num_gpus"] for n, d in deployments.items()
             if n in ("VisionEncoder", "AudioEncoder", "TTSDecoder", "Vocoder")]
    assert sum(media) == 1.0  # one replica of each media stage shares one GPU


# Live sessions each config's LLMCore replica must take on (admission promises each its whole session limit):
# the headers' numbers; the one-GPU config carries the GPU benchmark's 64 sessions.
LIVE_SESSIONS = {"local-cpu": 16, "single-gpu-node": 64, "multi-node": 97}


def test_each_llm_replica_admits_the_live_sessions_its_header_promises(config_name):
    from services.llm_core.admission import AdmissionPolicy
    from services.llm_core.context_window import WindowPolicy
    from services.llm_core.engine.cuda_graphs import KERNEL_BLOCK

    args = AppArgs.model_validate(_app(_load(config_name))["args"])
    limits = args.limits
    kv_budget = args.deployment("LLMCore", args.device).init_kwargs["kv_budget_tokens"]
    window = WindowPolicy(limits.context_window_tokens, limits.context_keep_tokens)
    policy = AdmissionPolicy(kv_budget, limits.max_session_tokens, window, KERNEL_BLOCK)
    assert policy.live_sessions == LIVE_SESSIONS[config_name]


def test_a_stage_that_may_scale_counts_its_sessions_and_direct_calls():
    """Requests in flight say little about live sessions (they hold state between units): an LLMCore or AudioEncoder
    deployment with room to add replicas must also count the sessions, or it never scales for them. And Serve does
    not count the live unit's calls, which go to the encoders and LLMCore directly (`services.runtime.direct`): a
    VisionEncoder with room to scale counts them through the same policy."""
    from services.runtime.autoscaling import SessionLoadPolicy

    scaling = {(config, name): _deployments(_load(config))[name]["autoscaling_config"]
               for config in CONFIGS for name in ("LLMCore", "AudioEncoder", "VisionEncoder")}  # fmt: skip
    scalable = {key: s for key, s in scaling.items() if s["max_replicas"] > s["min_replicas"]}
    assert {("multi-node", "LLMCore"), ("multi-node", "AudioEncoder"), ("multi-node", "VisionEncoder")} <= set(scalable)
    for key, s in scalable.items():
        assert _import(s["policy"]["policy_function"]) is SessionLoadPolicy, key
        SessionLoadPolicy(**s["policy"].get("policy_kwargs", {}))


def _stream_bytes() -> int:
    """The most one live session's streaming Whisper cache holds on the real model (bf16): K and V of every layer
    over the 1500 positions of its 30 s window."""
    audio = real_config().audio
    return 2 * audio.encoder_layers * audio.d_model * 2 * audio.max_source_positions


MEDIA_SLACK_BYTES = 2e9  # a media stage's activations and CUDA context


def test_each_audio_replica_has_room_and_memory_for_its_live_streams(config_name):
    from services.audio_encoder.deployment import AudioEncoder

    config = _load(config_name)
    args = AppArgs.model_validate(_app(config)["args"])
    default = inspect.signature(AudioEncoder.func_or_class.__init__).parameters["max_live_streams"].default
    streams = args.deployment("AudioEncoder", args.device).init_kwargs.get("max_live_streams", default)
    deployments = _deployments(config)
    if all(deployments[n]["autoscaling_config"]["max_replicas"] == 1 for n in ("AudioEncoder", "LLMCore")):
        assert streams >= LIVE_SESSIONS[config_name], "the one AudioEncoder must hold every session LLMCore admits"
    if args.device == "cuda":
        need = _bytes("audio") + streams * _stream_bytes() + MEDIA_SLACK_BYTES
        share = deployments["AudioEncoder"]["ray_actor_options"]["num_gpus"] * GPU_GB
        assert need <= share, f"AudioEncoder needs {need / 1e9:.1f} GB of its {share / 1e9:.1f} GB"
