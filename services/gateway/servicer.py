"""The public gRPC methods of `minicpmo.v1.MiniCPMO` (and `grpc.health.v1.Health`), as the Gateway deployment
serves them behind Ray Serve's gRPC proxy.

Each method authenticates the caller (API key in metadata), runs the request, and turns errors into gRPC
statuses with a message a person can act on: the status an error carries (`services.runtime.errors`, read off
the original error even when it crossed a Ray call), UNAVAILABLE for a stage or the store that is down (safe to
retry), INTERNAL only for what is a bug. A client's error is one WARNING line in the log, never a traceback.

How a status reaches the client through the proxy: the proxy applies the gRPC context that comes with each
result, so an error sets the code on the context and returns a result (an empty message) instead of raising;
a streamed answer that fails after it started carries its status on one last empty event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from redis.exceptions import RedisError

from protos.minicpmo.v1 import omni_pb2
from services.gateway.auth import ApiKeyAuth
from services.gateway.grpc_api import MalformedRequest
from services.gateway.live import LiveSessions
from services.runtime import metrics
from services.runtime.errors import InvalidArgument, ServingError, original

log = logging.getLogger("ray.serve")
WATCH_PERIOD_S = 2.0
HEALTH_SERVICES = {"", "minicpmo.v1.MiniCPMO", "grpc.health.v1.Health"}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status of an error raised here or in a downstream deployment."""
    err = original(exc)
    if isinstance(err, ServingError):
        return err.code, err.message
    if isinstance(err, BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the server is at capacity; retry shortly"
    if isinstance(err, (RayActorError, DeploymentUnavailableError, RedisError, ConnectionError)):
        return grpc.StatusCode.UNAVAILABLE, f"a pipeline stage is unavailable, retry: {type(err).__name__}"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(err).__name__}); the server log has the details"


class GatewayServicer:
    """Mixin of the Gateway deployment: method names match the proto's RPC names (Ray Serve routes on them)."""

    auth: ApiKeyAuth
    live: LiveSessions

    def _fail(self, rpc: str, exc: BaseException, grpc_context) -> None:
        code, msg = status_for(exc)
        metrics.ERRORS.inc(tags={"rpc": rpc, "code": code.name})
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s failed", rpc, exc_info=exc)
        else:
            log.warning("%s refused: %s %s", rpc, code.name, msg)
        grpc_context.set_code(code)
        grpc_context.set_details(msg)

    async def _unary(self, rpc: str, request, grpc_context, empty: Any, run: Callable[[str], Any]) -> Any:
        metrics.REQUESTS.inc(tags={"rpc": rpc})
        try:
            return await run(self._caller(request, grpc_context))
        except Exception as e:
            self._fail(rpc, e, grpc_context)
            return empty

    async def _stream(self, rpc: str, request, grpc_context, run: Callable[[str], AsyncIterator]) -> AsyncIterator:
        metrics.REQUESTS.inc(tags={"rpc": rpc})
        try:
            async for event in run(self._caller(request, grpc_context)):
                yield event
        except asyncio.CancelledError:
            raise  # the client went away
        except Exception as e:
            self._fail(rpc, e, grpc_context)
            yield omni_pb2.ChatEvent()  # carries the status to the proxy (see the module doc)

    def _caller(self, request, grpc_context) -> str:
        caller = self.auth.authenticate_metadata(grpc_context.invocation_metadata())
        if isinstance(request, MalformedRequest):
            raise InvalidArgument(
                f"the request is not a valid {request.message_type} message ({request.error}); string fields "
                "must be valid UTF-8"
            )
        return caller

    async def Chat(self, request: omni_pb2.ChatRequest, grpc_context) -> AsyncIterator[omni_pb2.ChatEvent]:
        async for event in self._stream("Chat", request, grpc_context, lambda caller: self.chat(request)):
            yield event

    async def CreateSession(self, request: omni_pb2.CreateSessionRequest, grpc_context) -> omni_pb2.SessionInfo:
        return await self._unary("CreateSession", request, grpc_context, omni_pb2.SessionInfo(),
                                 lambda caller: self.live.create(caller, request))  # fmt: skip

    async def AppendUnit(self, request: omni_pb2.AppendUnitRequest, grpc_context) -> omni_pb2.AppendUnitResponse:
        return await self._unary("AppendUnit", request, grpc_context, omni_pb2.AppendUnitResponse(),
                                 lambda caller: self.live.append(caller, request))  # fmt: skip

    async def Respond(self, request: omni_pb2.RespondRequest, grpc_context) -> AsyncIterator[omni_pb2.ChatEvent]:
        async for event in self._stream("Respond", request, grpc_context, lambda caller: self.live.respond(caller, request)):
            yield event

    async def Interrupt(self, request: omni_pb2.InterruptRequest, grpc_context) -> omni_pb2.InterruptResponse:
        return await self._unary("Interrupt", request, grpc_context, omni_pb2.InterruptResponse(),
                                 lambda caller: self.live.interrupt(caller, request.session_id))  # fmt: skip

    async def CloseSession(self, request: omni_pb2.CloseSessionRequest, grpc_context) -> omni_pb2.CloseSessionResponse:
        async def close(caller: str) -> omni_pb2.CloseSessionResponse:
            await self.live.close(caller, request.session_id)
            return omni_pb2.CloseSessionResponse()

        return await self._unary("CloseSession", request, grpc_context, omni_pb2.CloseSessionResponse(), close)

    async def GetSession(self, request: omni_pb2.GetSessionRequest, grpc_context) -> omni_pb2.SessionInfo:
        return await self._unary("GetSession", request, grpc_context, omni_pb2.SessionInfo(),
                                 lambda caller: self.live.info(caller, request.session_id))  # fmt: skip

    # grpc.health.v1.Health/Check (registered on the proxy with the health servicer's add_*_to_server, so the
    # proxy routes it here). No API key: Kubernetes probes carry none. "" = the whole server, or a service name.
    async def Check(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        if request.service not in HEALTH_SERVICES:
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        ok = await self.live.records.healthy()
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
