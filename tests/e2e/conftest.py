"""One real local Ray cluster + Ray Serve app + redis-server for the whole e2e test session.

The app is the production application (`services.gateway.app:build_app`) on the golden tiny checkpoint, on CPU,
with Ray Serve's gRPC proxy on a free 127.0.0.1 port; tests talk to it over a real gRPC channel only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from services.client.sdk import MiniCPMOClient
from tests.servers import RedisServer, free_port

KEYS = ("e2e-key-alpha", "e2e-key-beta")
APP_NAME = "minicpmo"
IDLE_TTL_S = 45  # short, so the expiry test waits under a minute; long enough to outlive a replica restart
MAX_SESSION_TOKENS = 2048  # small, so the limit test reaches it with a few appends


@dataclass
class ServedApp:
    target: str
    redis_url: str
    model_dir: str
    keys: tuple[str, ...]
    max_session_tokens: int
    redis: RedisServer


@pytest.fixture(scope="session")
def served(golden) -> ServedApp:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from services.gateway.app import GRPC_SERVICER_FUNCTIONS, build_app

    redis = RedisServer.start()
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
            "limits": {"session_idle_ttl_s": IDLE_TTL_S, "max_session_tokens": MAX_SESSION_TOKENS},
        })  # fmt: skip
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield served
    finally:
        serve.shutdown()
        ray.shutdown()
        served.redis.stop()  # the redis-loss test may have replaced the server


@pytest.fixture
def client(served: ServedApp):
    with MiniCPMOClient(served.target, api_key=served.keys[0]) as c:
        yield c


@pytest.fixture
def other_client(served: ServedApp):
    with MiniCPMOClient(served.target, api_key=served.keys[1]) as c:
        yield c
