"""The public gRPC methods of `minicpmo.v1.MiniCPMO` (and `grpc.health.v1.Health/Check`), as the Gateway
deployment serves them behind Ray Serve's gRPC proxy.

Each method authenticates the caller (API key in metadata), runs the pipeline, and turns errors into gRPC
status codes with a message a person can act on. A bad request fails alone: nothing here or downstream keeps
state from it, and the replicas go on serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from grpc_health.v1 import health_pb2
from redis.exceptions import RedisError
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from protos.minicpmo.v1 import omni_pb2
from services.gateway import metrics
from services.gateway.auth import ApiKeyAuth, PermissionDenied, Unauthenticated
from services.gateway.pipeline import LimitExceeded, Pipeline
from services.gateway.sessions import InvalidTurn, LeaseLost, SessionLimitExceeded, SessionNotFound, StoreUnavailable

log = logging.getLogger("ray.serve")
WATCH_PERIOD_S = 2.0


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status of an error raised here or in a downstream deployment.

    Errors raised in another deployment arrive as Ray task errors that are also instances of the original
    class, so one `isinstance` ladder covers both.
    """
    from services.llm_core.engine.engine import ContextLengthError, EngineFullError

    msg = _message(exc)
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, msg
    if isinstance(exc, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED, msg
    if isinstance(exc, SessionNotFound):
        return grpc.StatusCode.NOT_FOUND, msg
    if isinstance(exc, InvalidTurn):
        return grpc.StatusCode.FAILED_PRECONDITION, f"{msg} (Interrupt the running answer first)"
    if isinstance(exc, (LimitExceeded, SessionLimitExceeded, EngineFullError, ContextLengthError, BackPressureError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, msg
    if isinstance(exc, ValueError):  # every input error of the components subclasses ValueError
        return grpc.StatusCode.INVALID_ARGUMENT, msg
    if isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError,
                        ConnectionError, LeaseLost, RedisError, StoreUnavailable)):  # fmt: skip
        return grpc.StatusCode.UNAVAILABLE, f"a pipeline stage is unavailable, retry: {msg}"
    return grpc.StatusCode.INTERNAL, msg


def _message(exc: BaseException) -> str:
    """The original error's message (a Ray task error's str carries a remote traceback)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return _message(cause)
    text = str(exc.args[0]) if exc.args and isinstance(exc.args[0], str) else str(exc)
    return text.strip().splitlines()[-1][:1000] if text else type(exc).__name__


class GatewayServicer:
    """Mixin of the Gateway deployment: method names match the proto's RPC names (Ray Serve routes on them)."""

    pipeline: Pipeline
    auth: ApiKeyAuth

    @asynccontextmanager
    async def _rpc(self, name: str, grpc_context):
        metrics.REQUESTS.inc(tags={"rpc": name})
        try:
            yield
        except Exception as e:
            code, msg = status_for(e)
            metrics.ERRORS.inc(tags={"rpc": name, "code": code.name})
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", name)
            grpc_context.set_code(code)
            grpc_context.set_details(msg)
            raise

    def _caller(self, grpc_context) -> str:
        return self.auth.authenticate_metadata(grpc_context.invocation_metadata())

    async def Chat(self, request: omni_pb2.ChatRequest, grpc_context) -> AsyncIterator[omni_pb2.ChatEvent]:
        async with self._rpc("Chat", grpc_context):
            self._caller(grpc_context)
            async for event in self.pipeline.chat(request):
                yield event

    async def CreateSession(self, request: omni_pb2.CreateSessionRequest, grpc_context) -> omni_pb2.SessionInfo:
        async with self._rpc("CreateSession", grpc_context):
            return await self.live.create(self._caller(grpc_context), request)

    async def AppendUnit(self, request: omni_pb2.AppendUnitRequest, grpc_context) -> omni_pb2.AppendUnitResponse:
        async with self._rpc("AppendUnit", grpc_context):
            return await self.live.append(self._caller(grpc_context), request)

    async def Respond(self, request: omni_pb2.RespondRequest, grpc_context) -> AsyncIterator[omni_pb2.ChatEvent]:
        async with self._rpc("Respond", grpc_context):
            caller = self._caller(grpc_context)
            async for event in self.live.respond(caller, request):
                yield event

    async def Interrupt(self, request: omni_pb2.InterruptRequest, grpc_context) -> omni_pb2.InterruptResponse:
        async with self._rpc("Interrupt", grpc_context):
            return await self.live.interrupt(self._caller(grpc_context), request.session_id)

    async def CloseSession(self, request: omni_pb2.CloseSessionRequest, grpc_context) -> omni_pb2.CloseSessionResponse:
        async with self._rpc("CloseSession", grpc_context):
            await self.live.close(self._caller(grpc_context), request.session_id)
            return omni_pb2.CloseSessionResponse()

    async def GetSession(self, request: omni_pb2.GetSessionRequest, grpc_context) -> omni_pb2.SessionInfo:
        async with self._rpc("GetSession", grpc_context):
            return await self.live.info(self._caller(grpc_context), request.session_id)

    # grpc.health.v1.Health/Check (registered on the proxy with the health servicer's add_*_to_server, so the
    # proxy routes it here). No API key: Kubernetes probes carry none. "" = the whole server, or a service name.
    async def Check(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        known = {"", "minicpmo.v1.MiniCPMO", "grpc.health.v1.Health"}
        if request.service not in known:
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        ok = await self.live.store_healthy()
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    # grpc.health.v1.Health/Watch: the current status at once, then each change (checked every few seconds).
    async def Watch(self, request: health_pb2.HealthCheckRequest) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            reply = await self.Check(request)
            if reply.status != last:
                last = reply.status
                yield reply
            await asyncio.sleep(WATCH_PERIOD_S)
