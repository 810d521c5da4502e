"""The AudioEncoder deployment's live chunks (its class run in process over a real redis-server): chunks of
different sessions that arrive together are encoded in one forward and give exactly what each session gets
alone; a bad chunk fails alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from protos.minicpmo.v1 import audio_pb2
from services.audio_encoder.deployment import AudioEncoder
from services.common.tensor_codec import from_proto, to_proto
from services.gateway.auth import key_hash
from services.gateway.sessions import SessionRecords
from tests.servers import redis_server, redis_url  # noqa: F401  (real redis-server fixtures)

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
def anyio_backend():
    return "asyncio"


def chunk(sid: str, pcm: np.ndarray, rid: str) -> audio_pb2.EncodeChunkRequest:
    return audio_pb2.EncodeChunkRequest(session_id=sid, pcm=to_proto(torch.from_numpy(pcm)), request_id=rid)


async def test_concurrent_sessions_share_forwards_and_keep_their_streams(golden, redis_url):  # noqa: F811
    records = SessionRecords.from_url(redis_url)
    encoder = AudioEncoder.func_or_class(str(golden.checkpoint), "cpu", redis_url)
    rng = np.random.default_rng(0)
    audio = [(rng.standard_normal(3 * 16000) * 0.1).astype(np.float32) for _ in range(4)]
    try:
        solo_ids = [(await records.create(key_hash("k"), "omni", "en")).session_id for _ in audio]
        solo = []
        for sid, pcm in zip(solo_ids, audio):  # one session at a time: no batch mates
            solo.append([from_proto((await encoder.EncodeChunk(chunk(sid, pcm[s : s + 16000], f"{sid}-{s}"))).items[0])
                         for s in range(0, len(pcm), 16000)])  # fmt: skip
        assert encoder.live.max_batch == 1
        together_ids = [(await records.create(key_hash("k"), "omni", "en")).session_id for _ in audio]

        async def feed(sid: str, pcm: np.ndarray) -> list[torch.Tensor]:
            return [from_proto((await encoder.EncodeChunk(chunk(sid, pcm[s : s + 16000], f"{sid}-{s}"))).items[0])
                    for s in range(0, len(pcm), 16000)]  # fmt: skip

        together = await asyncio.gather(*(feed(sid, pcm) for sid, pcm in zip(together_ids, audio)))
        assert encoder.live.max_batch > 1  # sessions' chunks shared forwards
        for a, b in zip(together, solo):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=0)

        bad = chunk(together_ids[0], np.zeros((2, 10), np.float32), "bad")  # not mono
        results = await asyncio.gather(encoder.EncodeChunk(bad), feed(together_ids[1], audio[1][:16000]),
                                       return_exceptions=True)  # fmt: skip
        assert isinstance(results[0], ValueError) and not isinstance(results[1], BaseException)
    finally:
        await records.aclose()
