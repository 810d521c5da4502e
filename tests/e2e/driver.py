"""The live-session driver run in the test process, over the deployments' real handles through stage calls a
test may wrap (a `RayStages` subclass), with the session records in the stack's Redis."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from ray import serve

from services.gateway.auth import key_hash
from services.gateway.context import GatewayContext
from services.gateway.live import LiveSessions
from services.gateway.requests import Limits
from services.gateway.sessions import SessionRecords
from services.gateway.stages import RayStages
from tests.stack import APP_NAME, ServedApp

STAGE_DEPLOYMENTS = ("VisionEncoder", "AudioEncoder", "LLMCore", "TTSDecoder")  # RayStages' argument order


@contextlib.asynccontextmanager
async def local_driver(
    served: ServedApp, make_stages: Callable[[list], RayStages]
) -> AsyncIterator[tuple[LiveSessions, str, RayStages]]:
    """(the driver, the caller id of the first API key, the stage calls made from `make_stages(handles)`)."""
    stages = make_stages([serve.get_deployment_handle(name, APP_NAME) for name in STAGE_DEPLOYMENTS])
    ctx = GatewayContext.from_model_dir(served.model_dir, stages, Limits(session_idle_ttl_s=served.idle_ttl_s))
    records = SessionRecords.from_url(served.redis_url, ttl_s=served.idle_ttl_s)
    try:
        yield LiveSessions(ctx, records), key_hash(served.keys[0]), stages
    finally:
        await records.aclose()
