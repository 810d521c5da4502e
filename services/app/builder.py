"""The Ray Serve application: `services.app.builder:build_app` (what `serve run` / `serve deploy` configs import).

It binds every stage with its options (`services.app.args`), hands each deployment the handles it calls (the
Gateway gets every stage; the TTSDecoder gets the Vocoder when that runs apart) and returns the Gateway as the
ingress.

gRPC (Ray Serve 2.60 proxy): register GRPC_SERVICER_FUNCTIONS in `grpc_options.grpc_servicer_functions`. The
proxy forwards every registered method to the ingress deployment's method of the same name, so
`grpc.health.v1.Health/Check` and `/Watch` are answered by `Gateway.Check` / `Gateway.Watch` (Kubernetes gRPC
probes work). Server reflection (a bidirectional stream, which the proxy would not forward) is served by the
proxy itself: `grpc_options.enable_reflection` (default true) registers it as a passthrough service that answers
from the descriptors of the registered services, so grpcurl/grpcui work without the .proto files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray import serve

from services.app.args import AppArgs
from services.app.serve_env import haproxy_ingress
from services.audio_encoder.deployment import AudioEncoder
from services.gateway.deployment import Gateway
from services.gateway.requests import Limits
from services.llm_core.deployment import LLMCore
from services.runtime.routing import affinity_router_config
from services.tts_decoder.deployment import TTSDecoder, Vocoder
from services.vision_encoder.deployment import VisionEncoder

DEPLOYMENTS = {d.name: d for d in (VisionEncoder, AudioEncoder, LLMCore, TTSDecoder, Vocoder, Gateway)}
# Deployments that hold per-session (or per-utterance) state: every call of a session goes to one replica (the
# Gateway's calls come through HAProxy when that is on, which hashes the session id itself: `serve_env`).
AFFINITY = {"Gateway", "AudioEncoder", "LLMCore", "TTSDecoder", "Vocoder"}
# ... and those whose per-utterance state exists only there: an utterance stays on its replica through a
# scale-up (sticky keys, `services.runtime.routing`) while it is used at least this often.
UTTERANCE_STICKY_S = {"TTSDecoder": 120.0, "Vocoder": 120.0}
TINY_DIR = Path(".run/tiny-checkpoint")
GRPC_SERVICER_FUNCTIONS = [
    "services.gateway.grpc_api.add_MiniCPMOServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def ensure_tiny_checkpoint(path: Path = TINY_DIR) -> str:
    """The embedded default model: a tiny random checkpoint in the official layout (its answers are noise)."""
    if not (path / "config.json").is_file():
        from services.common.tiny_checkpoint import make_tiny_checkpoint

        make_tiny_checkpoint(path)
    return str(path.resolve())


def deployment_options(name: str, args: AppArgs, device: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Deployment.options kwargs, extra constructor kwargs) of one deployment: defaults, then overrides."""
    spec = args.deployment(name, device)
    options = spec.options()
    if name in AFFINITY and not (name == "Gateway" and haproxy_ingress()):
        sticky = {"sticky_idle_s": UTTERANCE_STICKY_S[name]} if name in UTTERANCE_STICKY_S else {}
        options["request_router_config"] = affinity_router_config(request_router_kwargs=sticky)
    return options, spec.init_kwargs


def llm_session_kwargs(limits: Limits) -> dict[str, int]:
    """LLMCore's constructor arguments that the app's session limits set."""
    return {"max_session_tokens": limits.max_session_tokens, "context_window_tokens": limits.context_window_tokens,
            "context_keep_tokens": limits.context_keep_tokens}  # fmt: skip


def build_app(args: AppArgs) -> serve.Application:
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    device = args.device or default_device()
    model_dir = args.model_dir or os.environ.get("MODEL_DIR") or ensure_tiny_checkpoint()
    redis_url = args.redis_url or os.environ.get("MINICPMO_REDIS_URL")
    if not redis_url:
        raise ValueError("redis_url is required (args.redis_url or env MINICPMO_REDIS_URL)")
    limits = args.limits
    session = {"session_ttl_s": limits.session_idle_ttl_s}

    def bind(name: str, *ctor: Any, **kw: Any):
        options, init_kwargs = deployment_options(name, args, device)
        return DEPLOYMENTS[name].options(**options).bind(*ctor, **{**kw, **init_kwargs})

    vision = bind("VisionEncoder", model_dir, device)
    audio = bind("AudioEncoder", model_dir, device, redis_url, **session)
    llm = bind("LLMCore", model_dir, device, redis_url, **llm_session_kwargs(limits), **session)
    vocoder = bind("Vocoder", model_dir, device) if args.separate_vocoder else None
    tts = bind("TTSDecoder", model_dir, device, vocoder=vocoder)
    api_keys = args.api_keys or os.environ.get("MINICPMO_API_KEYS")
    return bind("Gateway", model_dir, redis_url, api_keys, limits, vision, audio, llm, tts)
