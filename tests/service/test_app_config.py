"""The application builder against every Ray Serve config in deploy/: the configs' app args and per-deployment
options must be what `build_app` and Serve accept (checked without starting Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.gateway.app import DEPLOYMENTS, build_app, deployment_options, limits_from
from services.client.cli import config_app_args

CONFIGS = sorted(Path("deploy").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_deploy_config_builds_the_app(path: Path, golden):
    args, grpc, _ = config_app_args(path)
    assert "protos.minicpmo.v1.omni_pb2_grpc.add_MiniCPMOServicer_to_server" in grpc["grpc_servicer_functions"]
    assert "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server" in grpc["grpc_servicer_functions"]
    args.update(model_dir=str(golden.checkpoint), redis_url="redis://127.0.0.1:1/0", api_keys="k")
    app = build_app(args)
    assert app is not None
    for name in DEPLOYMENTS:
        opts, _ = deployment_options(name, args, args.get("device", "cpu"))
        DEPLOYMENTS[name].options(**opts)  # Serve validates every option here
        if args.get("device") == "cuda" and name != "Gateway":
            assert opts["ray_actor_options"].get("num_gpus", 0) > 0, f"{path.name}: {name} gets no GPU"


def test_overrides_and_limits_are_applied():
    args = {"deployments": {"LLMCore": {"num_replicas": 3, "ray_actor_options": {"num_cpus": 2}, "init_kwargs": {"kv_budget_tokens": 7}}},
            "limits": {"max_new_tokens": 5}}  # fmt: skip
    opts, init = deployment_options("LLMCore", args, "cpu")
    assert opts["num_replicas"] == 3 and opts["ray_actor_options"]["num_cpus"] == 2 and init == {"kv_budget_tokens": 7}
    assert limits_from(args).max_new_tokens == 5
    with pytest.raises(ValueError, match="unknown limits"):
        limits_from({"limits": {"max_tokens_typo": 1}})
    with pytest.raises(ValueError, match="redis_url"):
        build_app({"model_dir": "x"})
