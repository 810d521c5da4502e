"""The AudioEncoder deployment's live chunks (its class run in process over a real redis-server): chunks of
different sessions that arrive together are encoded in one forward and give exactly what each session gets
alone; a bad chunk fails alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from protos.minicpmo.v1 import audio_pb2
from services.audio_encoder.deployment import AudioEncoder, StreamsFull
from services.common.tensor_codec import from_proto, to_proto
from services.gateway.auth import key_hash
from services.gateway.sessions import SessionRecords
from services.runtime.errors import ReplicaFull
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


async def test_a_replica_takes_on_at_most_max_live_streams_and_a_dropped_one_makes_room(golden, redis_url):  # noqa: F811
    """OpenStream admits a new session's stream; past `max_live_streams` the next is refused RESOURCE_EXHAUSTED
    (which the gateway answers by placing the session elsewhere), also for sessions being rebuilt concurrently; a
    dropped stream's room goes to the next session, and the share held is the replica's session load."""
    records = SessionRecords.from_url(redis_url)
    encoder = AudioEncoder.func_or_class(str(golden.checkpoint), "cpu", redis_url, max_live_streams=2)
    try:
        sids = [(await records.create(key_hash("k"), "omni", "en")).session_id for _ in range(4)]
        opened = await encoder.OpenStream(audio_pb2.OpenStreamRequest(session_id=sids[0]))
        assert (opened.live_streams, opened.max_live_streams) == (1, 2)
        assert encoder.record_autoscaling_stats() == {"session_load": 0.5, "direct_ongoing": 0.0}
        pcm = (np.random.default_rng(1).standard_normal(16000) * 0.1).astype(np.float32)
        # two more sessions at once (a first chunk rebuilds the stream): exactly one finds room
        results = await asyncio.gather(*(encoder.EncodeChunk(chunk(sid, pcm, f"{sid}-0")) for sid in sids[1:3]),
                                       return_exceptions=True)  # fmt: skip
        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(refused) == 1 and isinstance(refused[0], StreamsFull) and isinstance(refused[0], ReplicaFull)
        assert "2 live streams, its max_live_streams" in str(refused[0])
        assert len(encoder.streams) == 2
        assert encoder.record_autoscaling_stats() == {"session_load": 1.0, "direct_ongoing": 0.0}
        with pytest.raises(StreamsFull):
            await encoder.OpenStream(audio_pb2.OpenStreamRequest(session_id=sids[3]))
        await encoder.DropStream(audio_pb2.DropStreamRequest(session_id=sids[0]))
        await encoder.OpenStream(audio_pb2.OpenStreamRequest(session_id=sids[3]))
        assert set(encoder.streams) == {sids[3], *(s for s, r in zip(sids[1:3], results) if r is not refused[0])}
    finally:
        await records.aclose()
