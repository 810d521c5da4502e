"""Direct stage calls over a real TCP socket (`services.runtime.direct`): a replica's methods served by its
`DirectServer`, called with `DirectCalls.send` as the gateway calls them once Serve chose the replica. The target
is a plain object with the stage methods' shape; choosing the replica through Serve is covered end to end
(tests/e2e/test_transport.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from protos.minicpmo.v1 import llm_pb2, tensor_pb2
from services.common.tensor_codec import from_proto, to_proto
from services.runtime.direct import PORTS_ENV, DirectCallLost, DirectCalls, DirectServer, direct_ports
from services.runtime.errors import Internal, NotFound


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("no pickling")


class Stage:
    """Prefill-shaped methods: a request message, then any embeddings inputs."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def Prefill(self, request: llm_pb2.PrefillRequest, *inputs: tensor_pb2.Embeddings) -> llm_pb2.PrefillResponse:
        rows = sum(from_proto(item).shape[0] for e in inputs for item in e.items)
        return llm_pb2.PrefillResponse(kv_len=len(request.session_id) + rows)

    async def Missing(self, request: llm_pb2.PrefillRequest) -> llm_pb2.PrefillResponse:
        raise NotFound(f"session {request.session_id} does not exist")

    async def Broken(self, request: llm_pb2.PrefillRequest) -> llm_pb2.PrefillResponse:
        raise Unpicklable("a bug")

    async def Slow(self, request: llm_pb2.PrefillRequest) -> llm_pb2.PrefillResponse:
        await self.release.wait()
        return llm_pb2.PrefillResponse(kv_len=1)

    async def Delayed(self, request: llm_pb2.PrefillRequest) -> llm_pb2.PrefillResponse:
        """Replies after `kv_len` ms: calls sent together finish in another order."""
        await asyncio.sleep(len(request.session_id) / 1000)
        return llm_pb2.PrefillResponse(kv_len=len(request.session_id))


METHODS = {name: llm_pb2.PrefillRequest for name in ("Prefill", "Missing", "Broken", "Slow", "Delayed")}
REPLICA = "r1"


def call(calls: DirectCalls, address: str, method: str, replica: str = REPLICA, **request):
    """`method` of the stage at `address` with a PrefillRequest, as replica `replica`'s caller sends it."""
    return calls.send(address, replica, method, llm_pb2.PrefillRequest(**request), llm_pb2.PrefillResponse)


def served(test):
    """Run `test(stage, server, calls, address)` against a DirectServer on a free port, then stop both sides."""

    async def run():
        stage = Stage()
        server = DirectServer(stage, METHODS, REPLICA)
        address = await server.start("127.0.0.1")
        calls = DirectCalls()
        try:
            await test(stage, server, calls, address)
        finally:
            await server.stop()

    asyncio.run(run())


def test_a_reply_comes_back_with_the_inputs_applied():
    async def test(stage, server, calls, address):
        inputs = [tensor_pb2.Embeddings(items=[to_proto(torch.zeros(3, 4)), to_proto(torch.zeros(2, 4))])]
        reply = await calls.send(address, REPLICA, "Prefill", llm_pb2.PrefillRequest(session_id="abcd"),
                                 llm_pb2.PrefillResponse, inputs)  # fmt: skip
        assert reply.kv_len == 4 + 5
        assert server.ongoing == 0

    served(test)


def test_a_stage_error_arrives_as_itself_and_a_bug_as_internal():
    async def test(stage, server, calls, address):
        with pytest.raises(NotFound, match="session s1 does not exist"):
            await call(calls, address, "Missing", session_id="s1")
        with pytest.raises(Internal, match="Unpicklable: a bug"):
            await call(calls, address, "Broken")
        reply = await call(calls, address, "Prefill", session_id="ok")
        assert reply.kv_len == 2, "the server still serves after both"

    served(test)


def test_calls_sent_together_share_one_connection_and_each_gets_its_own_reply():
    async def test(stage, server, calls, address):
        lengths = [30, 1, 20, 5, 12, 0, 8]  # reply order differs from send order
        replies = await asyncio.gather(*(call(calls, address, "Delayed", session_id="x" * n) for n in lengths))
        assert [r.kv_len for r in replies] == lengths
        assert len(server._connections) == 1

    served(test)


def test_a_method_the_replica_does_not_serve_directly_is_lost_and_a_broken_stream_ends_only_itself():
    async def test(stage, server, calls, address):
        with pytest.raises(DirectCallLost, match="serves no direct Generate"):
            await call(calls, address, "Generate")
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"\xff" * 64)  # a frame header claiming ~4 GiB: not a direct-call stream
        assert await reader.read() == b"", "the server closes that connection"
        writer.close()
        assert (await call(calls, address, "Prefill", session_id="ok")).kv_len == 2, "and serves the others"

    served(test)


def test_calls_in_flight_are_counted_for_autoscaling():
    async def test(stage, server, calls, address):
        slow = [asyncio.create_task(call(calls, address, "Slow")) for _ in range(3)]
        while server.ongoing < 3:
            await asyncio.sleep(0.01)  # the server takes them as they arrive
        stage.release.set()
        assert [r.kv_len for r in await asyncio.gather(*slow)] == [1, 1, 1]
        assert server.ongoing == 0

    served(test)


def test_a_replica_gone_under_a_call_is_a_lost_call_to_retry():
    async def test(stage, server, calls, address):
        pending = asyncio.create_task(call(calls, address, "Slow"))
        while server.ongoing < 1:
            await asyncio.sleep(0.01)
        await server.stop()  # the replica's process ends: its server goes with it
        with pytest.raises(DirectCallLost):
            await pending
        with pytest.raises(DirectCallLost):  # and nothing listens there any more
            await call(calls, address, "Prefill")

    served(test)


def test_a_call_for_a_replica_whose_port_another_took_is_lost():
    async def test(stage, server, calls, address):
        with pytest.raises(DirectCallLost, match="replica r0 is gone from this port"):
            await call(calls, address, "Prefill", replica="r0")
        assert server.ongoing == 0
        assert (await call(calls, address, "Prefill", session_id="ok")).kv_len == 2

    served(test)


def test_a_replica_holds_its_port_alone(monkeypatch):
    """Serve binds its ingress replicas' gRPC ports with SO_REUSEPORT (gRPC's default): a Gateway given a port a
    stage's direct server held would share it and take half its connections. Ours binds exclusively: neither side
    can join the other."""

    async def run():
        holder = grpc.aio.server()  # as Serve binds: SO_REUSEPORT
        port = holder.add_insecure_port("0.0.0.0:0")
        await holder.start()
        monkeypatch.setenv(PORTS_ENV, f"{port}-{port}")
        with pytest.raises(RuntimeError, match=f"no free port for direct calls in {port}-{port}"):
            await DirectServer(Stage(), METHODS, REPLICA).start("127.0.0.1")
        await holder.stop(grace=None)

        server = DirectServer(Stage(), METHODS, REPLICA)
        assert await server.start("127.0.0.1") == f"127.0.0.1:{port}"
        try:
            with pytest.raises(RuntimeError, match="Failed to bind"):
                grpc.aio.server().add_insecure_port(f"0.0.0.0:{port}")
        finally:
            await server.stop()

    asyncio.run(run())


def test_replicas_on_one_node_take_different_ports_of_the_range():
    async def run():
        servers = [DirectServer(Stage(), METHODS, REPLICA) for _ in range(3)]
        try:
            ports = [int((await s.start("127.0.0.1")).rsplit(":", 1)[1]) for s in servers]
        finally:
            for s in servers:
                await s.stop()
        assert len(set(ports)) == 3 and all(p in direct_ports() for p in ports)

    asyncio.run(run())


@pytest.mark.parametrize("spec", ["25000", "a-b", "26000-25000", "0-10", "65000-70000"])
def test_a_bad_port_range_says_what_is_expected(monkeypatch, spec):
    monkeypatch.setenv(PORTS_ENV, spec)
    with pytest.raises(ValueError, match=f"{PORTS_ENV}='{spec}': expected a port range such as 25000-25999"):
        direct_ports()
