"""Direct stage calls: the live unit's hot path below Ray Serve's per-request machinery.

Why (measured on the 2-core box): a no-op call between two deployments through a Serve handle costs 2.5-3.5 ms,
1.3-1.8 ms of it the caller's CPU (router, request metadata, metrics, cloudpickle, the replica's request
wrapper), where a plain round trip between two processes costs a fraction of a millisecond (The wire, below). A
live unit makes three such calls, two of them one after the other on its critical path (encoder, then LLMCore's
prefill).

How: Serve still chooses the replica. `DeploymentHandle.choose_replica` runs the deployment's router (the
session-affinity router, its ranks and its back-off decide exactly as for any other call) in Serve's pick-only
mode (`_reserve=False`, what Serve's own HAProxy ingress router uses: no reservation round trip to the replica).
Only the send is ours: the call goes to the server the chosen replica runs beside Serve's (`DirectServer`), whose
address the replica published in its replica metadata. A replica that publishes none is called through the handle
as before, so a stage runs either way.

The wire: one TCP connection per caller and replica, carrying any number of calls at once as length-prefixed
protobuf frames (`DirectCall` out, `DirectReply` back, each frame naming its call). Deliberately not gRPC, which
these calls first used: measured on the 2-core box, a grpc.aio round trip between two processes took 1.4-4 ms at
the median (5-10 ms at p90) where the same bytes over asyncio's TCP streams took 0.27-0.34 ms: grpc.aio hands each
message between its EventEngine threads, its poller thread and the event loop, and every handoff is a thread
wake-up on a busy machine. A live unit makes two such calls one after the other (encoder, then LLMCore's prefill),
and timed inside the deployments each one-way hop cost 1.2-2.4 ms. Nothing of gRPC's is needed here: both ends
are our code, on one cluster network, calls are unary and bounded, and losing the connection is handled below.

What Serve no longer sees for these calls, and what stands in for it:
- ongoing requests for autoscaling: the replica counts its direct calls in flight and reports them as a custom
  metric (`DIRECT_ONGOING`), which `services.runtime.autoscaling.SessionLoadPolicy` adds to Serve's count;
- `max_ongoing_requests`: not applied; the stages queue these calls in their own batchers and engine, as they
  queue Serve's calls once admitted;
- the access log: a direct call that fails with anything but a `ServingError` is logged with its traceback here
  (a `ServingError` is the caller's to report);
- a replica that dies under a call: its connection closes, the call fails as lost (`DirectCallLost`) and is sent
  again through Serve, which handles a dead replica as it always did (it re-routes a call the replica never took,
  waits for the replacement, or raises `ActorDiedError` for the stage calls' own retries, `services.gateway.stages`).
  Sending it again is safe for the reason those retries are: each of these calls is stateless or carries a
  request id its stage recognises. Serve's router learns that a replica died only from a call it sent itself,
  and a pick-only choice never sends one, so calls to a replica lost this way go through Serve for a while
  (`LOST_FOR_S`), until the router has dropped that replica. A call names the replica it is for: one that
  took a dead replica's port since refuses it as lost.

Ports: each replica's server takes a free port of `MINICPMO_DIRECT_PORTS` (default 25000-25999), bound exclusively
(no SO_REUSEPORT). Not an OS-chosen port: those come from the kernel's ephemeral range, where Serve hands its
ingress replicas their own gRPC ports (40000-41000) and binds them with SO_REUSEPORT, as gRPC does by default; a
replacement Gateway given a port one of our servers held would share it, and take half of the connections meant
for that stage. The default range lies below the ephemeral range and apart from Ray's and Serve's own.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import struct
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message
from ray import serve
from ray.util import get_node_ip_address

from protos.minicpmo.v1 import direct_pb2, tensor_pb2
from services.runtime.errors import Internal, ServingError
from services.runtime.replica import detached, in_background

DIRECT_KEY = "direct"  # the replica metadata entry holding the replica's direct address
DIRECT_ONGOING = "direct_ongoing"  # the custom autoscaling metric: direct calls in flight on the replica
LOST_FOR_S = 60.0  # a replica lost under a call is called through Serve this long (its router drops it meanwhile)
MAX_FRAME = 256 << 20  # a frame's slices or a long clip's embeddings, never near it; more is a broken stream
PORTS_ENV = "MINICPMO_DIRECT_PORTS"
DEFAULT_PORTS = "25000-25999"
_HEADER = struct.Struct("!QI")  # call id, body length
ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine]
M = TypeVar("M", bound=Message)
log = logging.getLogger("ray.serve")


class DirectCallLost(ConnectionError):
    """The replica went away under a direct call (or is not the one called): the call may be retried on its
    replacement."""


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


# --- the wire ---------------------------------------------------------------------------------------------------


def _frame(call_id: int, body: bytes) -> bytes:
    return _HEADER.pack(call_id, len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next frame; IncompleteReadError at the end of the stream, ConnectionError for a broken one."""
    call_id, length = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if length > MAX_FRAME:
        raise ConnectionResetError(f"a frame of {length} bytes (at most {MAX_FRAME}): not a direct-call stream")
    return call_id, await reader.readexactly(length)


async def _listen(serve_connection: ConnectionHandler) -> tuple[asyncio.Server, int]:
    """Listen on every interface on the first free port of `direct_ports()`, searched from a point set by the process
    id, so that replicas starting together on one node rarely try the same ports."""
    ports = direct_ports()
    start = os.getpid() % len(ports)
    for i in range(len(ports)):
        port = ports[(start + i) % len(ports)]
        try:
            return await asyncio.start_server(serve_connection, "0.0.0.0", port, reuse_port=False), port
        except OSError:  # taken
            continue
    raise RuntimeError(f"no free port for direct calls in {ports.start}-{ports.stop - 1}; widen {PORTS_ENV}")


# --- the replica's side -----------------------------------------------------------------------------------------


class DirectServer:
    """The server replica `replica_id` runs beside Serve's: `methods` (name -> request type) of `target`, each an
    async method taking its request message and then any `Embeddings` inputs, called on the replica's own event
    loop, each call as it arrives (a connection's calls run concurrently)."""

    def __init__(self, target: Any, methods: dict[str, type[Message]], replica_id: str):
        self.target = target
        self.methods = methods
        self.replica_id = replica_id
        self.ongoing = 0
        self.address: str | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    async def start(self, host: str) -> str:
        """Serve on a free port of `direct_ports()` on every interface (callers run on other nodes); the address
        callers use."""
        if self.address is None:
            self._server, port = await _listen(self._serve_connection)
            self.address = f"{host}:{port}"
        return self.address

    async def stop(self) -> None:
        """Stop listening and close every connection: calls in progress are lost to their callers."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):
                writer.close()
            await self._server.wait_closed()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while True:
                call_id, body = await _read_frame(reader)
                in_background(self._answer(call_id, body, writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the caller went away (or sent garbage): replies to its calls in progress are dropped
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _answer(self, call_id: int, body: bytes, writer: asyncio.StreamWriter) -> None:
        reply = await self._reply(body)
        if writer.is_closing():
            return
        writer.write(_frame(call_id, reply.SerializeToString()))
        try:
            await writer.drain()
        except ConnectionError:
            pass  # the caller went away meanwhile

    async def _reply(self, body: bytes) -> direct_pb2.DirectReply:
        try:
            call = direct_pb2.DirectCall.FromString(body)
        except DecodeError as e:
            return direct_pb2.DirectReply(error=_pickled(Internal(f"a direct call that does not parse: {e}")))
        if call.replica != self.replica_id:  # meant for a replica that died: this one took its port since
            return direct_pb2.DirectReply(lost=f"replica {call.replica} is gone from this port")
        request_type = self.methods.get(call.method)
        if request_type is None:
            return direct_pb2.DirectReply(lost=f"replica {self.replica_id} serves no direct {call.method}")
        self.ongoing += 1
        try:
            reply = await getattr(self.target, call.method)(request_type.FromString(call.request), *call.inputs)
            return direct_pb2.DirectReply(reply=reply.SerializeToString())
        except Exception as e:
            if not isinstance(e, ServingError):
                log.exception("direct call %s failed", call.method)
            return direct_pb2.DirectReply(error=_pickled(e))
        finally:
            self.ongoing -= 1


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


# --- the caller's side ------------------------------------------------------------------------------------------


class _Connection:
    """A caller's connection to one replica's `DirectServer`: calls go out as they come, and each reply is matched
    to its call by id. When the connection ends, every call still waiting on it fails with ConnectionError."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.writer = writer
        self.waiting: dict[int, asyncio.Future] = {}
        self.closed = False
        self._ids = itertools.count()
        in_background(self._read_replies(reader))

    async def call(self, body: bytes) -> bytes:
        if self.closed:
            raise ConnectionResetError("the connection is closed")
        call_id = next(self._ids)
        reply = self.waiting[call_id] = asyncio.get_running_loop().create_future()
        try:
            self.writer.write(_frame(call_id, body))
            await self.writer.drain()
            return await reply
        finally:
            self.waiting.pop(call_id, None)

    def close(self) -> None:
        self.closed = True
        self.writer.close()

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        reason = "the replica closed the connection"
        try:
            while True:
                call_id, body = await _read_frame(reader)
                reply = self.waiting.get(call_id)
                if reply is not None and not reply.done():  # else its caller gave up on it
                    reply.set_result(body)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            reason = f"the connection to the replica ended ({type(e).__name__})"
        finally:
            self.close()
            for reply in self.waiting.values():
                if not reply.done():
                    reply.set_exception(ConnectionResetError(reason))


class DirectCalls:
    """The caller's side: a stage method called on the replica Serve's router chose, over one connection per
    replica address; through the handle when that replica serves no direct calls."""

    def __init__(self) -> None:
        self._connections: dict[str, asyncio.Future[_Connection]] = {}
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
        call = direct_pb2.DirectCall(request=request.SerializeToString(), inputs=inputs, replica=replica_id,
                                     method=method)  # fmt: skip
        try:
            raw = await (await self._connection(address)).call(call.SerializeToString())
        except OSError as e:  # refused, reset or closed: the replica (or its whole node) is gone
            self._forget(address, replica_id)
            raise DirectCallLost(f"{method} on {address}: {e}") from None
        reply = direct_pb2.DirectReply.FromString(raw)
        if reply.HasField("lost"):
            self._forget(address, replica_id)
            raise DirectCallLost(f"{method} on {address}: {reply.lost}")
        if reply.HasField("error"):
            raise pickle.loads(reply.error)
        return reply_type.FromString(reply.reply)

    def _recently_lost(self, replica_id: str) -> bool:
        lost_at = self._lost.get(replica_id)
        return lost_at is not None and time.monotonic() - lost_at < LOST_FOR_S

    def _forget(self, address: str, replica_id: str) -> None:
        """Drop the connection of a replica that went away (its replacement listens elsewhere, or on its port)."""
        now = time.monotonic()
        self._lost = {r: t for r, t in self._lost.items() if now - t < LOST_FOR_S}
        self._lost[replica_id] = now
        opened = self._connections.pop(address, None)
        if opened is not None and opened.done() and not _broken(opened):
            opened.result().close()

    async def _connection(self, address: str) -> _Connection:
        """The open connection to `address`, opened once for the calls that need it at the same time (one that
        fails to open is dropped by `send`, through `_forget`)."""
        opened = self._connections.get(address)
        if opened is None or (opened.done() and _broken(opened)):
            opened = self._connections[address] = asyncio.ensure_future(_connect(address))
        return await asyncio.shield(opened)


def _broken(opened: asyncio.Future[_Connection]) -> bool:
    """Whether a finished attempt to connect failed, or its connection has closed since."""
    return opened.cancelled() or opened.exception() is not None or opened.result().closed


async def _connect(address: str) -> _Connection:
    host, port = address.rsplit(":", 1)
    return _Connection(*await asyncio.open_connection(host, int(port)))
