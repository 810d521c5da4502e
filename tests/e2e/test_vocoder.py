"""The vocoder (DVAE + Vocos) as its own `Vocoder` deployment gives the same speech as inside `TTSDecoder`."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from ray import serve

from protos.minicpmo.v1 import omni_pb2
from services.app.builder import build_app
from services.client.sdk import MiniCPMOClient, generation_options, text, user

pytestmark = [pytest.mark.ray, pytest.mark.redis, pytest.mark.slow]

SEPARATE = "minicpmo-separate-vocoder"


def test_separate_vocoder_deployment_matches_inline(served, client):
    opts = generation_options(max_new_tokens=30, min_new_tokens=30, greedy=True, speech=True,
                              speech_output=omni_pb2.SPEECH_OUTPUT_BOTH, speech_greedy=True)  # fmt: skip
    messages = [user(text("Say it twice."))]
    inline = client.chat(messages, options=opts)
    app = build_app({"model_dir": served.model_dir, "redis_url": served.redis_url, "api_keys": ",".join(served.keys),
                     "device": "cpu", "separate_vocoder": True})  # fmt: skip
    serve.run(app, name=SEPARATE, route_prefix="/separate-vocoder")
    try:
        with MiniCPMOClient(served.target, api_key=served.keys[0], application=SEPARATE) as c:
            separate = c.chat(messages, options=opts)
            vocoder = serve.get_deployment_handle("Vocoder", SEPARATE)
            assert vocoder.Stats.remote().result()["active_streams"] == 0  # `last` freed the finished answer's
            _cancel_after_first_audio(c.chat_stream(messages, options=opts))
            assert _wait_for_no_streams(vocoder), "a cancelled answer left its vocoder stream behind"
    finally:
        serve.delete(SEPARATE)  # back to one app: clients without `application` metadata reach it again
    assert separate.token_ids == inline.token_ids
    assert [list(c.codes.shape) for c in separate.chunks] == [list(c.codes.shape) for c in inline.chunks]
    assert len(separate.chunks) >= 2
    np.testing.assert_allclose(separate.audio, inline.audio, atol=1e-5)


def _cancel_after_first_audio(stream) -> None:
    for event in stream:
        if event.HasField("audio"):
            stream.cancel()
            break
    with pytest.raises(grpc.RpcError) as cancelled:
        for _ in stream:
            pass
    assert cancelled.value.code() == grpc.StatusCode.CANCELLED


def _wait_for_no_streams(vocoder, timeout_s: float = 20.0) -> bool:
    """Poll the replica (the gateway frees the stream asynchronously after the client cancels)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if vocoder.Stats.remote().result()["active_streams"] == 0:
            return True
        time.sleep(0.2)
    return False
