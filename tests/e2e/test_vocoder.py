"""The vocoder (DVAE + Vocos) as its own `Vocoder` deployment gives the same speech as inside `TTSDecoder`."""

from __future__ import annotations

import numpy as np
import pytest
from ray import serve

from protos.minicpmo.v1 import omni_pb2
from services.gateway.app import build_app
from services.gateway.client import MiniCPMOClient, generation_options, text, user

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
    finally:
        serve.delete(SEPARATE)  # back to one app: clients without `application` metadata reach it again
    assert separate.token_ids == inline.token_ids
    assert [list(c.codes.shape) for c in separate.chunks] == [list(c.codes.shape) for c in inline.chunks]
    assert len(separate.chunks) >= 2
    np.testing.assert_allclose(separate.audio, inline.audio, atol=1e-5)
