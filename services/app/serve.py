"""`minicpmo serve`: the whole stack on this machine (what `make run` runs): a redis-server with an append-only
file (sessions survive a Redis restart), a local Ray cluster, and the application as a Serve config configures it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
from pathlib import Path

from services.app.redis_server import RedisServer
from services.app.serve_env import use_local_cluster_env

RUN_DIR = Path(".run")


def register_cli(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="run Redis (if needed), a local Ray cluster and every deployment; gRPC on :9000")
    p.add_argument("--model-dir", default=os.environ.get("MODEL_DIR"),
                   help="checkpoint directory (default: $MODEL_DIR, else a tiny random checkpoint)")
    p.add_argument("--redis-url", default=os.environ.get("MINICPMO_REDIS_URL"),
                   help="Redis URL (default: start a local redis-server with persistence in .run/redis)")
    p.add_argument("--api-keys", default=os.environ.get("MINICPMO_API_KEYS"),
                   help="comma list of accepted API keys (default: $MINICPMO_API_KEYS, else one generated key)")
    p.add_argument("--port", type=int, default=9000, help="gRPC port (default 9000)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--separate-vocoder", action="store_true", help="run DVAE + Vocos as their own deployment")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs the local Ray cluster may use")
    p.add_argument("--config", type=Path, default=Path("deploy/local-cpu.yaml"),
                   help="Ray Serve config whose app args, deployment options and gRPC options to use "
                        "(default deploy/local-cpu.yaml when present; command-line flags win)")  # fmt: skip
    p.set_defaults(func=serve_main)


def config_app_args(path: Path) -> tuple[dict, dict, dict]:
    """(build_app args, gRPC options, HTTP options) from a `serve run` config file: the first app's args, with its
    `deployments:` list folded into args["deployments"] (what `serve run` would apply on top of the app)."""
    import yaml

    cfg = yaml.safe_load(path.read_text())
    app = (cfg.get("applications") or [{}])[0]
    args = dict(app.get("args") or {})
    per = {k: dict(v) for k, v in (args.get("deployments") or {}).items()}
    for d in app.get("deployments") or []:
        d = dict(d)
        per.setdefault(d.pop("name"), {}).update(d)
    args["deployments"] = per
    return args, dict(cfg.get("grpc_options") or {}), dict(cfg.get("http_options") or {})


def serve_main(args: argparse.Namespace) -> int:
    use_local_cluster_env()  # a local, single-user cluster
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from services.app.builder import GRPC_SERVICER_FUNCTIONS, build_app

    redis = None
    redis_url = args.redis_url
    if not redis_url:
        redis = RedisServer(RUN_DIR / "redis", persistent=True).start()
        redis_url = redis.url
        print(f"started redis-server at {redis_url} (append-only file in {redis.workdir})", flush=True)
    keys = args.api_keys
    if not keys:
        keys = secrets.token_urlsafe(24)
        print(f"no API key configured: generated one for this run: {keys}", flush=True)
    try:
        app_args, grpc_cfg, http_cfg = config_app_args(args.config) if args.config.is_file() else ({}, {}, {})
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
        serve.start(
            http_options={"host": "127.0.0.1", "port": 8000, **http_cfg},
            grpc_options=gRPCOptions(**{
                **grpc_cfg, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS, "port": args.port,
            }),  # fmt: skip
        )
        app_args.update(redis_url=redis_url, api_keys=keys)
        if args.separate_vocoder:
            app_args["separate_vocoder"] = True
        if args.model_dir:
            app_args["model_dir"] = args.model_dir
        else:
            print("no MODEL_DIR: serving a tiny RANDOM checkpoint (its answers are noise)", flush=True)
        if args.device:
            app_args["device"] = args.device
        serve.run(build_app(app_args), name="minicpmo", route_prefix="/")
        http = {"host": "127.0.0.1", "port": 8000, **http_cfg}
        key = keys.split(",")[0]
        print(
            f"\nMiniCPM-o serving pipeline is up.\n"
            f"  gRPC:    {http['host']}:{args.port} (HAProxy binds it on the HTTP host; the API key guards it)\n"
            f"           minicpmo.v1.MiniCPMO, grpc.health.v1.Health, reflection; metadata 'x-api-key: <key>'\n"
            f"  HTTP:    http://{http['host']}:{http['port']}/v1 (OpenAI-compatible: chat/completions, realtime,\n"
            f"           models; header 'Authorization: Bearer <key>'); the web page at http://{http['host']}:"
            f"{http['port']}/\n"
            f"  try:     MINICPMO_API_KEY={key} .venv/bin/minicpmo chat --text 'Hello!'\n"
            f"  metrics: Ray's Prometheus endpoint (ray_minicpmo_* series)\n"
            f"Ctrl-C to stop.",
            flush=True,
        )
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # delivered to sigwait, not as KeyboardInterrupt mid-call
        signal.sigwait(stop)
    finally:
        serve.shutdown()
        ray.shutdown()
        if redis is not None:
            redis.stop()
    return 0
