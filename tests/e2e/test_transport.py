"""How the stages are called.

Replicas call each other with their own process's Serve transport, not the one baked into the handles they were
given: the process that built the app may have imported Ray Serve before `RAY_SERVE_USE_GRPC_BY_DEFAULT` was set
(the pipeline benchmark did, after its in-process run), and its handles then sent every stage call by reference
through the object store (unit p50 86-89 ms deployed against 54 ms by value, same box and run). The live unit's
calls go to the replica Serve chose over that replica's direct server (`services.runtime.direct`)."""

from __future__ import annotations

import asyncio

import pytest
import ray.serve._private.constants as serve_constants
from ray import serve

from protos.minicpmo.v1 import tensor_pb2, vision_pb2
from services.runtime.direct import DIRECT_KEY, DirectCalls
from services.runtime.replica import with_own_transport
from services.vision_encoder.processor import ImageInputError
from tests.e2e.media import image_bytes
from tests.stack import APP_NAME

pytestmark = [pytest.mark.ray]


@pytest.mark.parametrize("grpc_by_default", [True, False])
def test_a_handle_takes_the_transport_of_the_process_that_calls(served, monkeypatch, grpc_by_default):
    given = serve.get_deployment_handle("LLMCore", APP_NAME).options(_by_reference=grpc_by_default)  # the other one
    monkeypatch.setattr(serve_constants, "RAY_SERVE_USE_GRPC_BY_DEFAULT", grpc_by_default)
    own = with_own_transport(given)
    assert own.handle_options._by_reference is not grpc_by_default
    assert own.options(session_id="s").handle_options._by_reference is not grpc_by_default, "kept by later options"


def test_the_live_units_stages_take_calls_directly(served, golden):
    """The stages of the live unit (encoders, LLMCore's prefill) publish the address of their direct server, which
    takes calls for the replica Serve's router names, and answers as the same call through Serve does; a stage's
    error arrives as itself."""

    async def run():
        for name in ("VisionEncoder", "AudioEncoder", "LLMCore"):
            handle = serve.get_deployment_handle(name, APP_NAME).options(session_id="s")
            async with handle.check_health.choose_replica(_reserve=False) as chosen:
                assert chosen.replica_metadata.get(DIRECT_KEY), f"{name} publishes no direct address"
        vision = serve.get_deployment_handle("VisionEncoder", APP_NAME)
        request = vision_pb2.EncodeImagesRequest(images=[image_bytes(golden, "image_unit0.png")], max_slice_nums=1)
        calls = DirectCalls()
        async with vision.Encode.choose_replica(request, _reserve=False) as chosen:
            address = chosen.replica_metadata[DIRECT_KEY]
        direct = await calls.send(address, chosen.replica_id, "Encode", request, tensor_pb2.Embeddings)
        through_serve = await vision.Encode.remote(request)
        assert direct.SerializeToString() == through_serve.SerializeToString()
        corrupt = vision_pb2.EncodeImagesRequest(images=[b"\x89PNG not really"], max_slice_nums=1)
        with pytest.raises(ImageInputError, match="cannot decode image"):
            await calls.call(vision, "Encode", corrupt, tensor_pb2.Embeddings)

    asyncio.run(run())
