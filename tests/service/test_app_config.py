"""The application builder against every Ray Serve config in deploy/: the configs' app args and per-deployment
options must be what the typed argument schema and Serve accept (checked without starting Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.app.args import DEFAULTS, AppArgs, DeploymentSpec
from services.app.builder import DEPLOYMENTS, GRPC_SERVICER_FUNCTIONS, build_app, deployment_options
from services.app.serve_env import SERVE_ENV
from services.app.serve import config_app_args

CONFIGS = sorted(Path("deploy").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_deploy_config_builds_the_app(path: Path, golden):
    args, grpc, _ = config_app_args(path)
    assert grpc["grpc_servicer_functions"] == GRPC_SERVICER_FUNCTIONS
    args.update(model_dir=str(golden.checkpoint), redis_url="redis://127.0.0.1:1/0", api_keys="k")
    parsed = AppArgs.model_validate(args)  # every key the config sets is one the schema knows
    assert build_app(parsed) is not None
    for name in DEPLOYMENTS:
        opts, _ = deployment_options(name, parsed, parsed.device or "cpu")
        DEPLOYMENTS[name].options(**opts)  # Serve validates every option here
        if parsed.device == "cuda" and name != "Gateway":
            assert opts["ray_actor_options"].get("num_gpus", 0) > 0, f"{path.name}: {name} gets no GPU"


def test_every_deployment_has_its_defaults_here_and_none_in_the_code():
    assert set(DEFAULTS) == set(DEPLOYMENTS)
    for name, deployment in DEPLOYMENTS.items():
        # the decorators name the deployment and nothing else: options come from the schema's defaults
        assert deployment._deployment_config.user_configured_option_names <= {"name"}, name


def test_overrides_merge_over_defaults():
    args = AppArgs.model_validate({
        "deployments": {"LLMCore": {"num_replicas": 3, "ray_actor_options": {"num_cpus": 2},
                                    "init_kwargs": {"kv_budget_tokens": 7}}},
        "limits": {"max_new_tokens": 5},
    })  # fmt: skip
    opts, init = deployment_options("LLMCore", args, "cpu")
    assert opts["num_replicas"] == 3 and opts["ray_actor_options"] == {"num_cpus": 2}
    assert opts["max_ongoing_requests"] == DEFAULTS["LLMCore"].max_ongoing_requests and init == {"kv_budget_tokens": 7}
    assert "num_gpus" not in opts["ray_actor_options"]  # GPU shares only on CUDA
    assert deployment_options("LLMCore", args, "cuda")[0]["ray_actor_options"]["num_gpus"] == 0.68
    assert args.limits.max_new_tokens == 5
    scaled = DeploymentSpec(num_replicas=2).merged(DeploymentSpec(autoscaling_config={"min_replicas": 1}))
    assert scaled.num_replicas is None  # autoscaling replaces a fixed replica count


@pytest.mark.parametrize(
    "bad", [{"limits": {"max_tokens_typo": 1}}, {"deployments": {"LLMCor": {}}}, {"device": "tpu"}, {"typo": 1},
            {"deployments": {"LLMCore": {"max_ongoing": 3}}}],
)  # fmt: skip
def test_unknown_arguments_are_refused(bad):
    with pytest.raises(ValidationError):
        AppArgs.model_validate(bad)


def test_redis_url_is_required(monkeypatch):
    monkeypatch.delenv("MINICPMO_REDIS_URL", raising=False)
    with pytest.raises(ValueError, match="redis_url"):
        build_app({"model_dir": "x"})


def test_only_utterance_stages_route_sticky():
    """Utterances live only in their TTSDecoder / Vocoder replica: their keys stay put through a scale-up. Sessions
    whose state Redis can rebuild (AudioEncoder, LLMCore) follow the rendezvous owner, the same for every router."""
    args = AppArgs.model_validate({})
    sticky = {name: deployment_options(name, args, "cpu")[0]["request_router_config"].request_router_kwargs
              for name in ("AudioEncoder", "LLMCore", "TTSDecoder", "Vocoder")}  # fmt: skip
    assert {name for name, kw in sticky.items() if kw.get("sticky_idle_s", 0) > 0} == {"TTSDecoder", "Vocoder"}


@pytest.mark.parametrize("haproxy", ["1", "0"])
def test_the_gateway_is_routed_by_session_by_haproxy_or_else_by_serve(monkeypatch, haproxy):
    """Under HAProxy ingress, Serve refuses a custom router on the ingress: HAProxy hashes the session id itself
    (`serve_env`). Behind Serve's own proxy, the session-affinity router picks the Gateway replica."""
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", haproxy)
    options = deployment_options("Gateway", AppArgs.model_validate({}), "cpu")[0]
    if haproxy == "1":
        assert "request_router_config" not in options
        assert SERVE_ENV["RAY_SERVE_HAPROXY_BALANCE_ALGORITHM"] == "hdr(session_id)"
    else:
        assert options["request_router_config"].request_router_class.endswith("SessionAffinityRouter")
