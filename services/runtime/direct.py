"""Direct stage calls: the live unit's hot path below Ray Serve's per-request machinery.

Why (measured on the 2-core box): a no-op call between two deployments through a Serve handle costs 2.5-3.5 ms,
1.3-1.8 ms of it the caller's CPU (router, request metadata, metrics, cloudpickle, the replica's request
wrapper), where a plain `grpc.aio` round trip between two processes costs 0.47 ms. A live unit makes three such
calls, two of them one after the other on its critical path (encoder, then LLMCore's prefill).

How: Serve still chooses the replica. `DeploymentHandle.choose_replica` runs the deployment's router (the
session-affinity router, its ranks and its back-off decide exactly as for any other call) in Serve's pick-only
mode (`_reserve=False`, what Serve's own HAProxy ingress router uses: no reservation round trip to the replica).
Only the send is ours: the call goes to the gRPC server the chosen replica runs beside Serve's (`DirectServer`),
whose address the replica published in its replica metadata. A replica that publishes none is called through the
handle as before, so a stage runs either way.

What Serve no longer sees for these calls, and what stands in for it:
- ongoing requests for autoscaling: the replica counts its direct calls in flight and reports them as a custom
  metric (`DIRECT_ONGOING`), which `services.runtime.autoscaling.SessionLoadPolicy` adds to Serve's count;
- `max_ongoing_requests`: not applied; the stages queue these calls in their own batchers and engine, as they
  queue Serve's calls once admitted;
- the access log: a direct call that fails with anything but a `ServingError` is logged with its traceback here
  (a `ServingError` is the caller's to report);
- a replica that dies under a call: the call fails UNAVAILABLE (`DirectCallLost`) and is sent again through
  Serve, which handles a dead replica as it always did (it re-routes a call the replica never took, waits for
  the replacement, or raises `ActorDiedError` for the stage calls' own retries, `services.gateway.stages`).
  Sending it again is safe for the reason those retries are: each of these calls is stateless or carries a
  request id its stage recognises. Serve's router learns that a replica died only from a call it sent itself,
  and a pick-only choice never sends one, so calls to a replica lost this way go through Serve for a while
  (`LOST_FOR_S`), until the router has dropped that replica. A call names the replica it is for: one that
  took a dead replica's port since refuses it as lost.

Ports: each replica's server takes a free port of `MINICPMO_DIRECT_PORTS` (default 25000-25999), bound exclusively.
Not an OS-chosen port: those come from the kernel's ephemeral range, where Serve hands its ingress replicas their
own gRPC ports (40000-41000) and binds them with SO_REUSEPORT, as gRPC does by default; a replacement Gateway
given a port one of our servers held would share it, and take half of the connections meant for that stage.
The default range lies below the ephemeral range and apart from Ray's and Serve's own.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from ray import serve
from ray.util import get_node_ip_address

from protos.minicpmo.v1 import direct_pb2, tensor_pb2
from services.runtime.errors import Internal, ServingError
from services.runtime.replica import detached, in_background

DIRECT_KEY = "direct"  # the replica metadata entry holding the replica's direct address
DIRECT_ONGOING = "direct_ongoing"  # the custom autoscaling metric: direct calls in flight on the replica
SERVICE = "minicpmo.v1.Direct"
LOST_FOR_S = 60.0  # a replica lost under a call is called through Serve this long (its router drops it meanwhile)
_MAX_MESSAGE = 256 << 20  # a frame's slices or a long clip's embeddings, never near it
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", _MAX_MESSAGE), ("grpc.max_receive_message_length", _MAX_MESSAGE)]
_SERVER_OPTIONS = [*_CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)]  # the port is ours alone (module doc: Ports)
PORTS_ENV = "MINICPMO_DIRECT_PORTS"
DEFAULT_PORTS = "25000-25999"
M = TypeVar("M", bound=Message)
log = logging.getLogger("ray.serve")


class DirectCallLost(ConnectionError):
    """The replica went away under a direct call (UNAVAILABLE): the call may be retried on its replacement."""


def _pickled(error: Exception) -> bytes:
    try:
        return pickle.dumps(error)
    except Exception:  # an exception that does not pickle still reaches the caller, as what it said
        return pickle.dumps(Internal(f"{type(error).__name__}: {error}"))


def direct_ports() -> range:
    """The ports replicas serve direct calls on: `MINICPMO_DIRECT_PORTS`, "first-last"."""
    spec = os.environ.get(PORTS_ENV, DEFAULT_PORTS)
    try:
        first, last = (int(p) for p in spec.split("-"))
        valid = 0 < first <= last < 65536
    except ValueError:  # not two integers
        valid = False
    if not valid:
        raise ValueError(f"{PORTS_ENV}={spec!r}: expected a port range such as {DEFAULT_PORTS}")
    return range(first, last + 1)


def _bind(server: grpc.aio.Server) -> int:
    """Bind `server` on every interface to the first free port of `direct_ports()`, searched from a point set by
    the process id, so that replicas starting together on one node rarely try the same ports."""
    ports = direct_ports()
    start = os.getpid() % len(ports)
    for i in range(len(ports)):
        port = ports[(start + i) % len(ports)]
        try:
            return server.add_insecure_port(f"0.0.0.0:{port}")
        except RuntimeError:  # taken (gRPC logs the bind error)
            continue
    raise RuntimeError(f"no free port for direct calls in {ports.start}-{ports.stop - 1}; widen {PORTS_ENV}")


class DirectServer:
    """The gRPC server replica `replica_id` runs beside Serve's: `methods` (name -> request type) of `target`, each an
    async method taking its request message and then any `Embeddings` inputs, called on the replica's own event
    loop."""

    def __init__(self, target: Any, methods: dict[str, type[Message]], replica_id: str):
        self.target = target
        self.methods = methods
        self.replica_id = replica_id
        self.ongoing = 0
        self.address: str | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self, host: str) -> str:
        """Serve on a free port of `direct_ports()` on every interface (callers run on other nodes); the address
        callers use."""
        if self.address is None:
            server = grpc.aio.server(options=_SERVER_OPTIONS)
            handlers = {name: grpc.unary_unary_rpc_method_handler(self._handler(name, request_type))
                        for name, request_type in self.methods.items()}  # fmt: skip
            server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
            port = _bind(server)
            await server.start()
            self._server, self.address = server, f"{host}:{port}"
        return self.address

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)

    def _handler(self, name: str, request_type: type[Message]):
        method = getattr(self.target, name)

        async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            call = direct_pb2.DirectCall.FromString(raw)
            if call.replica != self.replica_id:  # meant for a replica that died: this one took its port since
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"replica {call.replica} is gone from this port")
            self.ongoing += 1
            try:
                reply = await method(request_type.FromString(call.request), *call.inputs)
                return direct_pb2.DirectReply(reply=reply.SerializeToString()).SerializeToString()
            except Exception as e:
                if not isinstance(e, ServingError):
                    log.exception("direct call %s failed", name)
                return direct_pb2.DirectReply(error=_pickled(e)).SerializeToString()
            finally:
                self.ongoing -= 1

        return handle


class DirectReplica:
    """Mixin for a stage deployment: runs its `direct_methods` on a `DirectServer` once the replica is ready, and
    publishes its address (beside what the other mixins publish) and its calls in flight."""

    direct_methods: dict[str, type[Message]] = {}
    _direct: DirectServer | None = None

    async def record_replica_metadata(self) -> dict[str, Any]:
        base = getattr(super(), "record_replica_metadata", None)
        metadata = dict(base()) if base is not None else {}
        if self._direct is None:
            replica_id = serve.get_replica_context().replica_id.unique_id  # as the callers' routers name it
            self._direct = DirectServer(self, self.direct_methods, replica_id)
        metadata[DIRECT_KEY] = await self._direct.start(get_node_ip_address())
        return metadata

    def direct_stats(self) -> dict[str, float]:
        return {DIRECT_ONGOING: float(self._direct.ongoing if self._direct is not None else 0)}

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self.direct_stats()


class DirectCalls:
    """The caller's side: a stage method called on the replica Serve's router chose, over one channel per
    replica address; through the handle when that replica serves no direct calls."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._lost: dict[str, float] = {}  # replica id -> when a call to it was lost

    async def call(self, handle: Any, method: str, request: Message, reply_type: type[M],
                   inputs: Sequence[tensor_pb2.Embeddings] = ()) -> M:  # fmt: skip
        bound = getattr(handle, method)
        async with bound.choose_replica(request, _reserve=False) as chosen:
            address, replica_id = chosen.replica_metadata.get(DIRECT_KEY), chosen.replica_id
        if address is not None and not self._recently_lost(replica_id):
            try:
                return await self.send(address, replica_id, method, request, reply_type, inputs)
            except DirectCallLost as e:
                log.warning("%s; sending it again through Serve", e)
        return await detached(bound.remote, request, *inputs)

    async def send(self, address: str, replica_id: str, method: str, request: Message, reply_type: type[M],
                   inputs: Sequence[tensor_pb2.Embeddings] = ()) -> M:  # fmt: skip
        """`method` on replica `replica_id`, serving direct calls at `address`: its reply, or the error it raised."""
        call = direct_pb2.DirectCall(request=request.SerializeToString(), inputs=inputs, replica=replica_id)
        payload = call.SerializeToString()
        try:
            raw = await self._channel(address).unary_unary(f"/{SERVICE}/{method}")(payload)
        except grpc.aio.AioRpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED):  # else: no direct server
                raise Internal(f"direct call {method} to {address} failed: {e.code().name} {e.details()}") from None
            self._forget(address, replica_id)
            raise DirectCallLost(f"{method} on {address}: {e.details()}") from None
        reply = direct_pb2.DirectReply.FromString(raw)
        if reply.HasField("error"):
            raise pickle.loads(reply.error)
        return reply_type.FromString(reply.reply)

    def _recently_lost(self, replica_id: str) -> bool:
        lost_at = self._lost.get(replica_id)
        return lost_at is not None and time.monotonic() - lost_at < LOST_FOR_S

    def _forget(self, address: str, replica_id: str) -> None:
        """Drop the channel of a replica that went away (its replacement listens elsewhere, or on its port)."""
        now = time.monotonic()
        self._lost = {r: t for r, t in self._lost.items() if now - t < LOST_FOR_S}
        self._lost[replica_id] = now
        channel = self._channels.pop(address, None)
        if channel is not None:
            in_background(channel.close())

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        return channel
