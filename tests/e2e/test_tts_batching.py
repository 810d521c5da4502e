"""The speech deployments under concurrency and long utterances: concurrent speech answers keep their solo codes
(their steps may share batched forward passes on the TTSDecoder replica; that batching is tested in process,
where it does not depend on timing) and every utterance is freed; the separate Vocoder deployment flushes at a
segment end but keeps the stream (its overlap codes) until the utterance ends."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from ray import serve

from protos.minicpmo.v1 import omni_pb2, tts_pb2
from services.client.sdk import generation_options, text, user
from services.common.tensor_codec import from_proto, to_proto
from services.tts_decoder.deployment import Vocoder as VocoderDeployment
from services.tts_decoder.vocoder import WaveDecoder
from tests.e2e.conftest import APP_NAME

pytestmark = [pytest.mark.ray, pytest.mark.redis, pytest.mark.slow]

PROMPTS = ("Say it twice.", "Read me a poem.", "Count to ten.", "What is the weather like?")
VOCODER_APP = "minicpmo-vocoder-only"


def speech_codes(answer) -> torch.Tensor:
    return torch.cat([from_proto(c.codes) for c in answer.chunks])


def test_concurrent_speech_answers_keep_their_solo_codes(client):
    tts = serve.get_deployment_handle("TTSDecoder", app_name=APP_NAME)
    opts = generation_options(max_new_tokens=24, min_new_tokens=24, greedy=True, speech=True,
                              speech_output=omni_pb2.SPEECH_OUTPUT_CODES, speech_greedy=True)  # fmt: skip

    def ask(prompt: str):
        return client.chat([user(text(prompt))], options=opts)

    solo = [ask(p) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(ask, PROMPTS))
    assert tts.Stats.remote().result()["active_utterances"] == 0  # every utterance was finished and freed
    for a, b in zip(together, solo):
        assert a.token_ids == b.token_ids
        assert len(b.chunks) >= 1
        assert torch.equal(speech_codes(a), speech_codes(b))


def test_vocoder_deployment_keeps_the_stream_across_a_segment_end(served):
    """Codes of two segments, as a rolled-over utterance sends them: the first chunk after the segment end is
    decoded with the previous segment's last 4 codes (same as in process), and `last` frees the stream."""
    voc = WaveDecoder.from_checkpoint(served.model_dir)
    gen = torch.Generator().manual_seed(5)
    sizes, ends = (25, 12, 25, 14), (False, True, False, True)
    chunks = [torch.randint(0, 625, (n, 4), generator=gen) for n in sizes]
    stream = voc.new_stream()
    expected = [voc.push(stream, c, flush=e) for c, e in zip(chunks, ends)]

    handle = serve.run(VocoderDeployment.bind(served.model_dir, "cpu"), name=VOCODER_APP, route_prefix=None)
    try:
        decode = handle.options(session_id="utt-1").Decode
        got = []
        for i, (c, e) in enumerate(zip(chunks, ends)):
            req = tts_pb2.DecodeRequest(utterance_id="utt-1", codes=to_proto(c), end_of_segment=e,
                                        last=i == len(chunks) - 1)  # fmt: skip
            got.append(from_proto(decode.remote(req).result().audio).numpy())
        # after `last` the same id starts a fresh stream (no overlap codes, no held tail from before)
        again = decode.remote(tts_pb2.DecodeRequest(utterance_id="utt-1", codes=to_proto(chunks[2]), last=True))
        fresh = voc.push(voc.new_stream(), chunks[2], flush=True)
        np.testing.assert_allclose(from_proto(again.result().audio).numpy(), fresh, atol=1e-6)
    finally:
        serve.delete(VOCODER_APP)
    assert [len(g) for g in got] == [len(e) for e in expected]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=1e-6)
