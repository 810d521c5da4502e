"""The application's arguments, typed: what `serve run` / `serve deploy` configs pass as `args` (Ray Serve
validates them against `AppArgs` before calling the builder), and the ONE place where every deployment's
default options live (`DEFAULTS`). A Serve config overrides them per deployment, either in its own
`deployments:` list (Serve applies that on top of the app) or in `args.deployments` (constructor arguments,
`init_kwargs`, only go there); the deploy-config tests check every config against this schema.

Defaults are for one node: fractions of a CPU that add up to what a 2-core machine has, and, on CUDA, GPU shares
that fit the stages on one 80 GB GPU as `deploy/single-gpu-node.yaml` books them (LLM 0.68, vision 0.06, audio
0.16: its 64 live streams, TTS 0.1).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.gateway.requests import Limits

DeploymentName = Literal["Gateway", "VisionEncoder", "AudioEncoder", "LLMCore", "TTSDecoder", "Vocoder"]


class DeploymentSpec(BaseModel):
    """`Deployment.options(...)` of one deployment, and its extra constructor arguments (`init_kwargs`)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = None
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int | None = None
    max_queued_requests: int | None = None
    health_check_period_s: float | None = None
    health_check_timeout_s: float | None = None
    graceful_shutdown_timeout_s: float | None = None
    ray_actor_options: dict[str, Any] = Field(default_factory=dict)
    init_kwargs: dict[str, Any] = Field(default_factory=dict)

    def merged(self, override: DeploymentSpec) -> DeploymentSpec:
        """This spec with the fields `override` sets replaced (actor options and init kwargs merged key-wise)."""
        changes = override.model_dump(exclude_unset=True)
        changes["ray_actor_options"] = {**self.ray_actor_options, **override.ray_actor_options}
        changes["init_kwargs"] = {**self.init_kwargs, **override.init_kwargs}
        merged = self.model_copy(update=changes)
        if "autoscaling_config" in changes:
            merged.num_replicas = None
        return merged

    def options(self) -> dict[str, Any]:
        """Keyword arguments of `Deployment.options` (unset ones left to Serve's own defaults)."""
        return self.model_dump(exclude={"init_kwargs"}, exclude_none=True)


def _spec(max_ongoing: int, cpus: float, gpus: float = 0.0, **kw: Any) -> DeploymentSpec:
    actor: dict[str, Any] = {"num_cpus": cpus}
    if gpus:
        actor["num_gpus"] = gpus
    return DeploymentSpec(max_ongoing_requests=max_ongoing, health_check_period_s=10, health_check_timeout_s=30,
                          ray_actor_options=actor, **kw)  # fmt: skip


DEFAULTS: dict[str, DeploymentSpec] = {
    "Gateway": _spec(128, 0.25),
    "VisionEncoder": _spec(32, 0.25, 0.06),
    "AudioEncoder": _spec(32, 0.25, 0.16),
    "LLMCore": _spec(128, 0.5, 0.68, graceful_shutdown_timeout_s=60),
    # Above the deployment's 32 KV slots: each speaking utterance holds one Speak stream while its PushText calls
    # come and go, so a full pool must refuse the next Speak (RESOURCE_EXHAUSTED), not queue the pushes.
    "TTSDecoder": _spec(128, 0.5, 0.1),
    "Vocoder": _spec(32, 0.25, 0.1),
}


class AppArgs(BaseModel):
    """`args` of the application. Endpoints and secrets come from the environment when not given here."""

    model_config = ConfigDict(extra="forbid")

    model_dir: str | None = None  # env MODEL_DIR; else a tiny random checkpoint in .run/tiny-checkpoint
    redis_url: str | None = None  # env MINICPMO_REDIS_URL
    api_keys: str | list[str] | None = None  # env MINICPMO_API_KEYS
    device: Literal["cpu", "cuda"] | None = None  # default: cuda if available
    separate_vocoder: bool = False  # DVAE + Vocos as their own `Vocoder` deployment
    limits: Limits = Field(default_factory=Limits)
    deployments: dict[DeploymentName, DeploymentSpec] = Field(default_factory=dict)

    def deployment(self, name: str, device: str) -> DeploymentSpec:
        """The defaults of `name` with this app's overrides; GPU shares only on CUDA."""
        spec = DEFAULTS[name]
        if not device.startswith("cuda"):
            actor = {k: v for k, v in spec.ray_actor_options.items() if k != "num_gpus"}
            spec = spec.model_copy(update={"ray_actor_options": actor})
        return spec.merged(self.deployments[name]) if name in self.deployments else spec
