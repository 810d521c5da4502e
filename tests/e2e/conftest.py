"""One real local Ray cluster + Ray Serve app + redis-server for the whole e2e test session.

The app is the production application (`services.app.builder:build_app`) on the golden tiny checkpoint, on CPU,
with Ray Serve's gRPC proxy on a free 127.0.0.1 port; tests talk to it over a real gRPC channel only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from services.client.sdk import MiniCPMOClient
from services.app.redis_server import RedisServer, free_port

KEYS = ("e2e-key-alpha", "e2e-key-beta")
APP_NAME = "minicpmo"
IDLE_TTL_S = 300  # long enough to outlive replica restarts; the expiry test shortens one session's TTL
MAX_SESSION_TOKENS = 2048  # small, so the limit test reaches it with a few appends
CONTEXT_WINDOW = (1536, 768)  # (window, keep): small, so a live session rolls after ~15 units


@dataclass
class ServedApp:
    target: str
    redis_url: str
    model_dir: str
    keys: tuple[str, ...]
    max_session_tokens: int
    redis: RedisServer
    idle_ttl_s: int = IDLE_TTL_S


@pytest.fixture(scope="session")
def served(golden) -> ServedApp:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from services.app.builder import GRPC_SERVICER_FUNCTIONS, build_app

    redis = RedisServer(persistent=True).start()  # as `make run` and the k8s manifests run it
    grpc_port = free_port()
    model_dir = str(golden.checkpoint)
    served = ServedApp(f"127.0.0.1:{grpc_port}", redis.url, model_dir, KEYS, MAX_SESSION_TOKENS, redis)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="minicpmo-e2e")
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": free_port()},
            grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
        )
        app = build_app({
            "model_dir": model_dir, "redis_url": redis.url, "api_keys": ",".join(KEYS), "device": "cpu",
            "limits": {"session_idle_ttl_s": IDLE_TTL_S, "max_session_tokens": MAX_SESSION_TOKENS,
                       "context_window_tokens": CONTEXT_WINDOW[0], "context_keep_tokens": CONTEXT_WINDOW[1]},
        })  # fmt: skip
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield served
    finally:
        serve.shutdown()
        ray.shutdown()
        served.redis.close()


@pytest.fixture
def client(served: ServedApp):
    with MiniCPMOClient(served.target, api_key=served.keys[0]) as c:
        yield c


@pytest.fixture
def other_client(served: ServedApp):
    with MiniCPMOClient(served.target, api_key=served.keys[1]) as c:
        yield c
