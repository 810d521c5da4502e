"""Ray Serve deployment `Gateway`: the gRPC ingress (through Ray Serve's gRPC proxy) of `minicpmo.v1.MiniCPMO`.

Stateless between requests: live-session state lives in Redis and in the stage replicas that own it, so any
gateway replica can serve any call and the gateway scales out freely.
"""

from __future__ import annotations

from ray import serve

from services.common.routing import SessionAffinityReplica, affinity_router_config
from services.gateway.auth import ApiKeyAuth
from services.gateway.live import LiveSessions
from services.gateway.pipeline import Limits, Pipeline, Stages
from services.gateway.servicer import GatewayServicer


@serve.deployment(
    name="Gateway",
    max_ongoing_requests=128,
    ray_actor_options={"num_cpus": 0.25},
    health_check_period_s=10,
    # Calls that carry `session_id` metadata stick to one gateway replica, which holds the session's partial
    # second of audio (the TDM muxer); everything else about a session is in Redis and the stage replicas.
    request_router_config=affinity_router_config(),
)
class Gateway(GatewayServicer, SessionAffinityReplica):
    def __init__(
        self,
        model_dir: str,
        redis_url: str,
        api_keys: list[str] | str | None,
        limits: Limits,
        vision,
        audio,
        llm,
        tts,
        vocoder=None,
    ):
        self.auth = ApiKeyAuth.from_config(api_keys)
        self.pipeline = Pipeline(model_dir, Stages(vision, audio, llm, tts, vocoder), limits)
        self.live = LiveSessions(self.pipeline, redis_url)

    # No custom check_health: a gateway replica is healthy while its event loop answers (Serve's default check).
    # Redis loss shows as NOT_SERVING on grpc.health.v1 instead: restarting replicas would not bring Redis back.
