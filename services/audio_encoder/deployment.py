"""Ray Serve deployment `AudioEncoder`: offline clips (chat) and live 1 s chunks through per-session streaming
Whisper KV state.

A session's stream state lives in one replica (the session-affinity router sends its chunks there; a Redis lease
with a fencing epoch says who holds it). Each chunk goes into the session's replay log before it is encoded; a
replica that takes a session over (the owner died or the router moved it) re-encodes the logged chunks in order,
which rebuilds exactly the same Whisper state, so the session continues as if nothing happened.

A chunk carries the gateway's `request_id` (kept in its log entry), so a retry of a chunk the stream already
holds (its replica logged it, then died before replying) gets its embeddings again without being encoded twice:
the last chunk's embeddings are kept; an older one's are recomputed from the log.
"""

from __future__ import annotations

import numpy as np
import torch
from ray import serve

from protos.minicpmo.v1 import audio_pb2, tensor_pb2
from services.common.routing import SessionAffinityReplica, affinity_router_config
from services.common.tensor_codec import from_proto, to_proto
from services.gateway import metrics
from services.gateway.sessions import ReplayEntry, SessionLimitExceeded, SessionNotFound
from services.gateway.stage import OwnedSessions, device_alive, limit_threads, off_loop, replica_dtype, session_store

AUDIO_ENTRY = "audio"  # replay-log kind of a streaming chunk (0 LLM tokens: the LLM logs its own input)


@serve.deployment(
    name="AudioEncoder",
    max_ongoing_requests=32,
    ray_actor_options={"num_cpus": 0.25},
    health_check_period_s=10,
    request_router_config=affinity_router_config(),
)
class AudioEncoder(SessionAffinityReplica):
    def __init__(self, model_dir: str, device: str = "cpu", redis_url: str | None = None, session_ttl_s: int = 600):
        self.device = device
        from services.audio_encoder.encoder import AudioEncoder as Encoder

        limit_threads()
        self.encoder = Encoder(model_dir, device=device, dtype=replica_dtype(device))
        self.streams: dict = {}  # session id -> the encoder's AudioStreamState
        self.last: dict[str, tuple[str, torch.Tensor]] = {}  # session id -> (request id, embeddings) of its last chunk
        self.store = session_store(redis_url, ttl_s=session_ttl_s) if redis_url else None
        self.owned = OwnedSessions(self.store, "audio", self._drop_stream) if self.store else None

    def _drop_stream(self, session_id: str) -> bool:
        self.last.pop(session_id, None)
        return self.streams.pop(session_id, None) is not None

    async def Encode(self, request: audio_pb2.EncodeAudioRequest) -> audio_pb2.EncodeAudioResponse:
        with metrics.stage_timer("audio_offline"):
            result = await self._encode_batched(request)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _encode_batched(self, requests: list[audio_pb2.EncodeAudioRequest]) -> list:
        clips = [from_proto(c).numpy() for r in requests for c in r.clips]
        try:
            embeds = await off_loop(self.encoder.encode, clips)
        except ValueError:
            if len(requests) == 1:
                raise
            return [await self._encode_one(r) for r in requests]  # isolate the bad clip's request
        out, pos = [], 0
        for r in requests:
            n = len(r.clips)
            out.append(audio_pb2.EncodeAudioResponse(embeddings=[to_proto(e) for e in embeds[pos : pos + n]]))
            pos += n
        return out

    async def _encode_one(self, request: audio_pb2.EncodeAudioRequest):
        try:
            embeds = await off_loop(self.encoder.encode, [from_proto(c).numpy() for c in request.clips])
        except ValueError as e:
            return e
        return audio_pb2.EncodeAudioResponse(embeddings=[to_proto(e) for e in embeds])

    async def EncodeChunk(self, request: audio_pb2.EncodeChunkRequest) -> audio_pb2.EncodeChunkResponse:
        pcm = from_proto(request.pcm).numpy()
        with metrics.stage_timer("audio_chunk"):
            if request.fresh:
                state = self.encoder.new_stream()
                embeds = await off_loop(self.encoder.encode_chunk, state, pcm)
                return audio_pb2.EncodeChunkResponse(embeddings=to_proto(embeds))
            if self.store is None:
                raise RuntimeError("AudioEncoder was started without redis_url: live sessions are unavailable")
            sid = request.session_id
            rid = request.request_id
            async with self.owned.lock(sid):  # a session's chunks enter its stream one at a time, in order
                fence, rebuild = await self.owned.fence(sid, sid in self.streams)
                if rebuild:
                    await self._rebuild(sid, fence.epoch)
                if self.owned.result(sid, rid):  # a retry of a chunk the stream already holds
                    embeds = await self._logged_embeddings(sid, rid)
                else:
                    entry = ReplayEntry(AUDIO_ENTRY, 0, request.pcm.SerializeToString(), {"request_id": rid})
                    try:
                        await self.store.append_replay(sid, entry, fence=fence)
                        embeds = await off_loop(self.encoder.encode_chunk, self.streams[sid], pcm)
                    except (SessionLimitExceeded, SessionNotFound):
                        raise  # refused before anything was written: stream and log still agree
                    except BaseException:
                        self.owned.forget(sid)  # the log may hold a chunk the stream lacks: rebuild next time
                        raise
                    self.owned.record(sid, rid, True)
                    self.last[sid] = (rid, embeds)
        return audio_pb2.EncodeChunkResponse(embeddings=to_proto(embeds))

    async def _rebuild(self, sid: str, epoch: int) -> None:
        logged = [e for e in await self.store.replay(sid) if e.kind == AUDIO_ENTRY]
        self._drop_stream(sid)
        self.owned.discard(sid)
        state, embeds = await off_loop(self._encode_stream, [_pcm(e) for e in logged])
        self.streams[sid] = state
        for e in logged:
            self.owned.record(sid, e.meta.get("request_id", ""), True)
        if logged:
            self.last[sid] = (logged[-1].meta.get("request_id", ""), embeds)
        self.owned.built(sid, epoch)

    def _encode_stream(self, chunks: list[np.ndarray]):
        """A new stream fed `chunks` in order (same chunks in, same Whisper KV out); the last chunk's embeddings."""
        state, embeds = self.encoder.new_stream(), None
        for pcm in chunks:
            embeds = self.encoder.encode_chunk(state, pcm)
        return state, embeds

    async def _logged_embeddings(self, sid: str, rid: str) -> torch.Tensor:
        last_rid, embeds = self.last.get(sid, ("", None))
        if last_rid == rid:
            return embeds
        # An older chunk (never, with the gateway's one-chunk-at-a-time calls): re-encode the log up to it.
        chunks: list[np.ndarray] = []
        for e in await self.store.replay(sid):
            if e.kind == AUDIO_ENTRY:
                chunks.append(_pcm(e))
                if e.meta.get("request_id") == rid:
                    return (await off_loop(self._encode_stream, chunks))[1]
        raise RuntimeError(f"chunk {rid} of session {sid} is not in its replay log")

    async def DropStream(self, request: audio_pb2.DropStreamRequest) -> audio_pb2.DropStreamResponse:
        if self.owned is not None:
            self.owned.discard(request.session_id)
        return audio_pb2.DropStreamResponse(dropped=self._drop_stream(request.session_id))

    def check_health(self) -> None:
        device_alive(self.device)


def _pcm(entry: ReplayEntry) -> np.ndarray:
    return from_proto(tensor_pb2.Tensor.FromString(entry.payload)).numpy()
