"""The served stack the e2e tests and the fuzz campaign talk to: one local Ray cluster, Ray Serve with the
production application (`services.app.builder:build_app`) on CPU, a real redis-server, gRPC on a free port.

    with serve_stack(model_dir) as app:
        MiniCPMOClient(app.target, api_key=app.keys[0])
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from services.app.redis_server import RedisServer, free_port
from services.app.serve_env import use_local_cluster_env

KEYS = ("e2e-key-alpha", "e2e-key-beta")
APP_NAME = "minicpmo"
IDLE_TTL_S = 300  # long enough to outlive replica restarts; the expiry test shortens one session's TTL
MAX_SESSION_TOKENS = 2048  # small, so the limit test reaches it with a few appends
CONTEXT_WINDOW = (1536, 768)  # (window, keep): small, so a live session rolls after ~15 units


@dataclass
class ServedApp:
    target: str  # gRPC host:port
    http_url: str  # the HTTP proxy, http://host:port
    metrics_url: str  # the node's Prometheus endpoint (Ray's metrics agent)
    redis_url: str
    model_dir: str
    keys: tuple[str, ...]
    max_session_tokens: int
    redis: RedisServer
    idle_ttl_s: int = IDLE_TTL_S


@contextmanager
def serve_stack(
    model_dir: str,
    keys: tuple[str, ...] = KEYS,
    idle_ttl_s: int = IDLE_TTL_S,
    max_session_tokens: int = MAX_SESSION_TOKENS,
    context_window: tuple[int, int] = CONTEXT_WINDOW,
    num_cpus: int = 4,
) -> Iterator[ServedApp]:
    """Start everything, yield how to reach it, tear it all down (also when the body fails)."""
    use_local_cluster_env()
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from services.app.builder import GRPC_SERVICER_FUNCTIONS, build_app

    redis = RedisServer(persistent=True).start()  # as `make run` and the k8s manifests run it
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    app = ServedApp(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}",
                    f"http://127.0.0.1:{metrics_port}/metrics", redis.url, model_dir, keys, max_session_tokens,
                    redis, idle_ttl_s)  # fmt: skip
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, namespace="minicpmo-e2e",
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000})  # fmt: skip
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
        )
        application = build_app({
            "model_dir": model_dir, "redis_url": redis.url, "api_keys": ",".join(keys), "device": "cpu",
            "limits": {"session_idle_ttl_s": idle_ttl_s, "max_session_tokens": max_session_tokens,
                       "context_window_tokens": context_window[0], "context_keep_tokens": context_window[1]},
        })  # fmt: skip
        serve.run(application, name=APP_NAME, route_prefix="/")
        yield app
    finally:
        serve.shutdown()
        ray.shutdown()
        app.redis.close()
