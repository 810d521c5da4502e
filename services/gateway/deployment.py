"""Ray Serve deployment `Gateway`: the gRPC ingress (through Ray Serve's gRPC proxy) of `minicpmo.v1.MiniCPMO`,
and the HTTP ingress (through Ray Serve's HTTP proxy) of the OpenAI-compatible APIs and the web page.

Live-session state lives in Redis and in the stage replicas that own it, so any gateway replica can serve any
call; calls that carry `session_id` metadata stick to one replica (which keeps the session's muxer and the chain
of its calls in memory, and writes the muxer's content to Redis so another replica can continue the session).

HTTP: `@serve.ingress()` without an app, and `__serve_build_asgi_app__` returns the FastAPI app of this replica
(`services.gateway.openai.http`), built after `__init__` around this instance: the routes call the same
`chat` / `live` / `auth` as the gRPC methods, and live in their own package instead of on this class. The gRPC
proxy still calls the methods of the class by name (the ingress wrapper subclasses it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray import serve

from protos.minicpmo.v1 import omni_pb2
from services.gateway.auth import ApiKeyAuth
from services.gateway.chat import chat
from services.gateway.context import GatewayContext
from services.gateway.live import LiveSessions
from services.gateway.openai.http import build_http_app
from services.gateway.requests import Limits
from services.gateway.servicer import GatewayServicer
from services.gateway.sessions import SessionRecords
from services.gateway.stages import RayStages
from services.runtime.replica import reports_startup
from services.runtime.routing import SessionAffinityReplica


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway(GatewayServicer, SessionAffinityReplica):
    @reports_startup
    def __init__(self, model_dir: str, redis_url: str, api_keys: list[str] | str | None, limits: Limits,
                 vision, audio, llm, tts):  # fmt: skip
        self.auth = ApiKeyAuth.from_config(api_keys)
        self.ctx = GatewayContext.from_model_dir(model_dir, RayStages(vision, audio, llm, tts), limits)
        self.live = LiveSessions(self.ctx, SessionRecords.from_url(redis_url, ttl_s=limits.session_idle_ttl_s))

    def chat(self, request: omni_pb2.ChatRequest) -> AsyncIterator[omni_pb2.ChatEvent]:
        return chat(self.ctx, request)

    def __serve_build_asgi_app__(self):
        return build_http_app(self)

    # No custom check_health: a gateway replica is healthy while its event loop answers (Serve's default check).
    # Redis loss shows as NOT_SERVING on grpc.health.v1 instead: restarting replicas would not bring Redis back.
