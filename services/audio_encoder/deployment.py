"""Ray Serve deployment `AudioEncoder`: offline clips (chat) and live chunks through per-session streaming
Whisper KV state.

A session's stream lives in one replica (the session-affinity router sends its chunks there; the "audio" lease
says who holds it). Every chunk goes into the session's audio replay log before it is encoded; a replica that
takes a session over re-encodes the logged chunks in order, which rebuilds exactly the same Whisper state (the
protocol is `services.runtime.session_stage.SessionStage`).

Concurrent requests are batched (`services.runtime.batching.Batcher`): offline clips of several requests in one
encoder call; live chunks of different sessions that arrive together in one forward (`encode_chunks`: each
stream continues its own Whisper KV, results equal separate calls). A bad clip or chunk fails alone.

Admission: a stream's memory grows with its audio up to the 30 s window (147 MB on the real model, bf16), so a
replica takes at most `max_live_streams` sessions on, each at `OpenStream` when the session is created (or when a
moved session is rebuilt here); the next one is refused (`StreamsFull`, RESOURCE_EXHAUSTED), which places a new
session on another replica. The share of them held is the replica's session load for its autoscaling policy
(`services.runtime.autoscaling`).

The log stays short: when a chunk restarts the stream (its cache would pass Whisper's 1500 positions, 30 s, and
starts over, as upstream does), everything before that chunk can no longer affect the stream, so the log is
rewritten to hold only that chunk. A session's audio log thus never holds more than 30 s of PCM.
"""

from __future__ import annotations

import numpy as np
import torch
from ray import serve

from protos.minicpmo.v1 import audio_pb2, replay_pb2, tensor_pb2
from services.audio_encoder.encoder import AudioEmbedder, AudioStreamState
from services.common.tensor_codec import from_proto, to_proto
from services.runtime import metrics
from services.runtime.autoscaling import SESSION_LOAD
from services.runtime.batching import Batcher, each_alone_on_error, result_of
from services.runtime.direct import DirectReplica
from services.runtime.errors import ReplicaFull
from services.runtime.ownership import Fence, OwnershipStore
from services.runtime.replica import device_alive, limit_threads, off_loop, replica_dtype, reports_startup
from services.runtime.routing import SessionAffinityReplica, replica_id
from services.runtime.session_stage import SessionStage

AUDIO = tensor_pb2.Embeddings.MODALITY_AUDIO


def _embeddings(items: list[torch.Tensor]) -> tensor_pb2.Embeddings:
    return tensor_pb2.Embeddings(modality=AUDIO, items=[to_proto(e) for e in items])


class StreamsFull(ReplicaFull):
    """This replica holds its maximum of live streams."""


@serve.deployment(name="AudioEncoder")
class AudioEncoder(SessionStage, DirectReplica, SessionAffinityReplica):
    role = "audio"
    direct_methods = {"Encode": audio_pb2.EncodeAudioRequest, "EncodeChunk": audio_pb2.EncodeChunkRequest}

    @reports_startup
    def __init__(
        self,
        model_dir: str,
        device: str = "cpu",
        redis_url: str | None = None,
        session_ttl_s: int = 600,
        max_live_streams: int = 64,
    ):
        if max_live_streams < 1:
            raise ValueError(f"max_live_streams must be >= 1, got {max_live_streams}")
        limit_threads()
        self.device = device
        self.max_live_streams = max_live_streams
        self.embedder = AudioEmbedder.from_checkpoint(model_dir, device=device, dtype=replica_dtype(device))
        self.streams: dict[str, AudioStreamState] = {}
        self._building: set[str] = set()  # sessions whose stream `rebuild` is encoding from their log
        self.offline = Batcher(each_alone_on_error(self._encode_offline))
        self.live = Batcher(each_alone_on_error(self._encode_live))
        store = OwnershipStore.from_url(redis_url, ttl_s=session_ttl_s) if redis_url else None
        super().__init__(store, replica_id())

    # --- offline ---------------------------------------------------------------------------------------------

    async def Encode(self, request: audio_pb2.EncodeAudioRequest) -> tensor_pb2.Embeddings:
        with metrics.stage_timer("audio_offline"):
            return result_of(await self.offline.submit(request))

    def _encode_offline(self, requests: list[audio_pb2.EncodeAudioRequest]) -> list[tensor_pb2.Embeddings]:
        embeds = self.embedder.encode([from_proto(c).numpy() for r in requests for c in r.clips])
        out, pos = [], 0
        for r in requests:
            out.append(_embeddings(embeds[pos : pos + len(r.clips)]))
            pos += len(r.clips)
        return out

    # --- live ---------------------------------------------------------------------------------------------------

    async def EncodeChunk(self, request: audio_pb2.EncodeChunkRequest) -> tensor_pb2.Embeddings:
        pcm = from_proto(request.pcm).numpy()
        with metrics.stage_timer("audio_chunk"):
            if request.fresh:  # a throwaway stream (the system prompt's reference voice, as upstream)
                return _embeddings([await off_loop(self.embedder.encode_chunk, self.embedder.new_stream(), pcm)])
            sid = request.session_id
            entry = replay_pb2.ReplayEntry(request_id=request.request_id, audio_pcm=request.pcm)
            embeds = await self.log_then_apply(
                sid, request.request_id, lambda: entry, lambda fence: self._encode(fence, pcm, entry)
            )
        return _embeddings([embeds])

    async def _encode(self, fence: Fence, pcm: np.ndarray, entry: replay_pb2.ReplayEntry) -> torch.Tensor:
        state = self.streams[fence.session_id]
        resets = state.resets
        embeds = result_of(await self.live.submit((state, pcm)))
        if state.resets != resets:  # the stream started over at this chunk: the log needs nothing older
            await self._store().rewrite(fence.session_id, fence, [entry])
        return embeds

    def _encode_live(self, chunks: list[tuple[AudioStreamState, np.ndarray]]) -> list[torch.Tensor]:
        """The chunks of the sessions whose chunk is ready now, in one forward (one chunk per session: a
        session's chunks are applied one at a time under its lock; encode_chunks leaves every stream unchanged
        when it raises, so a batch with a bad chunk is redone chunk by chunk)."""
        states, pcms = zip(*chunks)
        return self.embedder.encode_chunks(list(states), list(pcms))

    async def OpenStream(self, request: audio_pb2.OpenStreamRequest) -> audio_pb2.OpenStreamResponse:
        async with self.owned(request.session_id):  # a new session's (empty) stream, admitted by `rebuild`
            pass
        return audio_pb2.OpenStreamResponse(live_streams=len(self.streams), max_live_streams=self.max_live_streams)

    async def DropStream(self, request: audio_pb2.DropStreamRequest) -> audio_pb2.DropStreamResponse:
        dropped = self.has_state(request.session_id)
        self.forget(request.session_id)
        return audio_pb2.DropStreamResponse(dropped=dropped)

    # --- SessionStage -------------------------------------------------------------------------------------------

    def has_state(self, session_id: str) -> bool:
        return session_id in self.streams

    def drop_state(self, session_id: str) -> None:
        self.streams.pop(session_id, None)

    async def rebuild(self, session_id: str, entries) -> dict[str, torch.Tensor]:
        held = len(self.streams) + len(self._building)  # streams being rebuilt right now hold their place
        if held >= self.max_live_streams:
            raise StreamsFull(
                f"AudioEncoder full: this replica holds {held} live streams, its max_live_streams. Retry later or "
                f"on another replica; more sessions per replica need a larger max_live_streams (and the memory: up "
                f"to 30 s of Whisper cache each)"
            )
        chunks = [(e.request_id, from_proto(e.audio_pcm).numpy()) for e in entries if e.HasField("audio_pcm")]
        self._building.add(session_id)
        try:
            state, results = await off_loop(self._encode_stream, chunks)
        finally:
            self._building.discard(session_id)
        self.streams[session_id] = state
        return results

    def _encode_stream(self, chunks: list[tuple[str, np.ndarray]]) -> tuple[AudioStreamState, dict[str, torch.Tensor]]:
        """A new stream fed the logged chunks in order (same chunks in, same Whisper state out)."""
        state, results = self.embedder.new_stream(), {}
        for rid, pcm in chunks:
            results[rid] = self.embedder.encode_chunk(state, pcm)
        return state, results

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics: the session load the autoscaling policy scales on, and the direct
        calls in flight (which Serve does not count)."""
        return {SESSION_LOAD: len(self.streams) / self.max_live_streams, **self.direct_stats()}

    def check_health(self) -> None:
        device_alive(self.device)
