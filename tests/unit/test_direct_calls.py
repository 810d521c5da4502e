"""Direct stage calls over a real gRPC socket (`services.runtime.direct`): a replica's methods served by its
`DirectServer`, called with `DirectCalls.send` as the gateway calls them once Serve chose the replica. The target
is a plain object with the stage methods' shape; choosing the replica through Serve is covered end to end
(tests/e2e/test_transport.py)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from protos.minicpmo.v1 import llm_pb2, tensor_pb2
from services.common.tensor_codec import from_proto, to_proto
from services.runtime.direct import DirectCallLost, DirectCalls, DirectServer
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


METHODS = {name: llm_pb2.PrefillRequest for name in ("Prefill", "Missing", "Broken", "Slow")}


def served(test):
    """Run `test(stage, server, calls, address)` against a DirectServer on a free port, then stop both sides."""

    async def run():
        stage = Stage()
        server = DirectServer(stage, METHODS)
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
        reply = await calls.send(address, "Prefill", llm_pb2.PrefillRequest(session_id="abcd"),
                                 llm_pb2.PrefillResponse, inputs)  # fmt: skip
        assert reply.kv_len == 4 + 5
        assert server.ongoing == 0

    served(test)


def test_a_stage_error_arrives_as_itself_and_a_bug_as_internal():
    async def test(stage, server, calls, address):
        with pytest.raises(NotFound, match="session s1 does not exist"):
            await calls.send(address, "Missing", llm_pb2.PrefillRequest(session_id="s1"), llm_pb2.PrefillResponse)
        with pytest.raises(Internal, match="Unpicklable: a bug"):
            await calls.send(address, "Broken", llm_pb2.PrefillRequest(), llm_pb2.PrefillResponse)
        reply = await calls.send(address, "Prefill", llm_pb2.PrefillRequest(session_id="ok"), llm_pb2.PrefillResponse)
        assert reply.kv_len == 2, "the server still serves after both"

    served(test)


def test_calls_in_flight_are_counted_for_autoscaling():
    async def test(stage, server, calls, address):
        slow = [asyncio.create_task(calls.send(address, "Slow", llm_pb2.PrefillRequest(), llm_pb2.PrefillResponse))
                for _ in range(3)]  # fmt: skip
        while server.ongoing < 3:
            await asyncio.sleep(0.01)  # the server takes them as they arrive
        stage.release.set()
        assert [r.kv_len for r in await asyncio.gather(*slow)] == [1, 1, 1]
        assert server.ongoing == 0

    served(test)


def test_a_replica_gone_under_a_call_is_a_lost_call_to_retry():
    async def test(stage, server, calls, address):
        pending = asyncio.create_task(calls.send(address, "Slow", llm_pb2.PrefillRequest(), llm_pb2.PrefillResponse))
        while server.ongoing < 1:
            await asyncio.sleep(0.01)
        await server.stop()  # the replica's process ends: its server goes with it
        with pytest.raises(DirectCallLost):
            await pending
        with pytest.raises(DirectCallLost):  # and nothing listens there any more
            await calls.send(address, "Prefill", llm_pb2.PrefillRequest(), llm_pb2.PrefillResponse)

    served(test)
