"""The Ray Serve application: `services.gateway.app:build_app` (for `serve run`/`serve deploy` configs).

    args = {
      "model_dir": "/models/MiniCPM-o-2_6",   # default: a tiny random checkpoint made in .run/tiny-checkpoint
      "redis_url": "redis://127.0.0.1:6379/0", # or env MINICPMO_REDIS_URL
      "api_keys": "key1,key2",                # or env MINICPMO_API_KEYS
      "device": "cpu" | "cuda",               # default: cuda if available
      "separate_vocoder": false,              # DVAE + Vocos as their own `Vocoder` deployment
      "limits": {"max_new_tokens": 2048, ...},  # services.gateway.pipeline.Limits fields
      "deployments": {"LLMCore": {"num_replicas": 2, "ray_actor_options": {"num_gpus": 1}}, ...},
      "LLMCore": {...}                         # same as deployments.LLMCore (either spelling)
    }

Per-deployment overrides are `Deployment.options(...)` keyword arguments (num_replicas, autoscaling_config,
max_ongoing_requests, ray_actor_options, health_check_period_s, request_router_config, ...) and may also carry
`init_kwargs`, extra constructor arguments of that deployment (e.g. LLMCore kv_budget_tokens).

gRPC (Ray Serve 2.60 proxy): register GRPC_SERVICER_FUNCTIONS in `grpc_options.grpc_servicer_functions`. The
proxy forwards every registered method to the ingress deployment's method of the same name, so
`grpc.health.v1.Health/Check` and `/Watch` are answered by `Gateway.Check` / `Gateway.Watch` (Kubernetes gRPC
probes work). Server reflection (a bidirectional stream, which the proxy would not
forward) is served by the proxy itself: `grpc_options.enable_reflection` (default true) registers it as a
passthrough service that answers from the descriptors of the registered services, so grpcurl/grpcui work
without the .proto files.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from ray import serve

from services.audio_encoder.deployment import AudioEncoder
from services.gateway.deployment import Gateway
from services.gateway.pipeline import Limits
from services.llm_core.deployment import LLMCore
from services.tts_decoder.deployment import TTSDecoder, Vocoder
from services.vision_encoder.deployment import VisionEncoder

DEPLOYMENTS = {d.name: d for d in (VisionEncoder, AudioEncoder, LLMCore, TTSDecoder, Vocoder, Gateway)}
TINY_DIR = Path(".run/tiny-checkpoint")
GRPC_SERVICER_FUNCTIONS = [
    "protos.minicpmo.v1.omni_pb2_grpc.add_MiniCPMOServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]

# Resource shares on one node; the GPU shares follow the design (encoders and TTS share a GPU, the LLM gets one).
_CPU_SHARES = {"VisionEncoder": 0.25, "AudioEncoder": 0.25, "LLMCore": 0.5, "TTSDecoder": 0.5, "Vocoder": 0.25, "Gateway": 0.25}
_GPU_SHARES = {"VisionEncoder": 0.2, "AudioEncoder": 0.2, "LLMCore": 1.0, "TTSDecoder": 0.4, "Vocoder": 0.2}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def ensure_tiny_checkpoint(path: Path = TINY_DIR) -> str:
    """The embedded default model: a tiny random checkpoint in the official layout (its answers are noise)."""
    if not (path / "config.json").is_file():
        from services.common.tiny_checkpoint import make_tiny_checkpoint

        make_tiny_checkpoint(path)
    return str(path.resolve())


def limits_from(args: dict[str, Any]) -> Limits:
    given = dict(args.get("limits") or {})
    known = {f.name for f in fields(Limits)}
    unknown = set(given) - known
    if unknown:
        raise ValueError(f"unknown limits {sorted(unknown)}; known: {sorted(known)}")
    return Limits(**given)


def deployment_options(name: str, args: dict[str, Any], device: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Deployment.options kwargs, extra constructor kwargs) of one deployment: defaults, then overrides."""
    actor = {"num_cpus": _CPU_SHARES[name]}
    if device.startswith("cuda") and name in _GPU_SHARES:
        actor["num_gpus"] = _GPU_SHARES[name]
    opts: dict[str, Any] = {"ray_actor_options": actor}
    over = dict((args.get("deployments") or {}).get(name) or args.get(name) or {})
    init_kwargs = over.pop("init_kwargs", {}) or {}
    if "ray_actor_options" in over:
        actor.update(over.pop("ray_actor_options"))
    opts.update(over)
    if "autoscaling_config" in opts:
        opts.pop("num_replicas", None)
    return opts, init_kwargs


def build_app(args: dict[str, Any]) -> serve.Application:
    args = dict(args or {})
    device = args.get("device") or default_device()
    model_dir = args.get("model_dir") or os.environ.get("MODEL_DIR") or ensure_tiny_checkpoint()
    redis_url = args.get("redis_url") or os.environ.get("MINICPMO_REDIS_URL")
    if not redis_url:
        raise ValueError("redis_url is required (args.redis_url or env MINICPMO_REDIS_URL)")
    separate_vocoder = bool(args.get("separate_vocoder", False))

    limits = limits_from(args)
    session = {"session_ttl_s": limits.session_idle_ttl_s}

    def bind(name: str, *ctor: Any, **kw: Any):
        opts, extra = deployment_options(name, args, device)
        return DEPLOYMENTS[name].options(**opts).bind(*ctor, **{**kw, **extra})

    vision = bind("VisionEncoder", model_dir, device)
    audio = bind("AudioEncoder", model_dir, device, redis_url, **session)
    llm = bind("LLMCore", model_dir, device, redis_url, max_session_tokens=limits.max_session_tokens, **session)
    tts = bind("TTSDecoder", model_dir, device, not separate_vocoder)
    vocoder = bind("Vocoder", model_dir, device) if separate_vocoder else None
    api_keys = args.get("api_keys") or os.environ.get("MINICPMO_API_KEYS")
    return bind("Gateway", model_dir, redis_url, api_keys, limits, vision, audio, llm, tts, vocoder)
