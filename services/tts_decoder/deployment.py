"""Ray Serve deployments `TTSDecoder` (ConditionalChatTTS, optionally with DVAE + Vocos) and `Vocoder` (DVAE +
Vocos alone, for when the vocoder should scale apart from the TTS backbone).

An utterance's state (TTS KV, code history, vocoder overlap) stays in the replica that started it: the gateway
routes every call of an utterance by its id (session affinity). Chunks carry their 4-codebook codes beside the
audio, so a client may ask for codes, audio or both.

Concurrent utterances on one replica share forward passes: every PushText/Finish goes through one `StepBatcher`,
which advances all utterances with work by one chunk per `step_many` (their 25 generation steps batched). It also
keeps all model and tokenizer use in one worker thread at a time (the fast tokenizer is not thread-safe).
"""

from __future__ import annotations

import time
from typing import Any

from ray import serve

from protos.minicpmo.v1 import tts_pb2
from services.common.routing import SessionAffinityReplica, affinity_router_config
from services.common.tensor_codec import from_proto, to_proto
from services.gateway import metrics
from services.gateway.stage import device_alive, limit_threads, off_loop, replica_dtype

SAMPLE_RATE = 24000


class UtteranceNotFound(LookupError):
    """The utterance was never started here, finished, or was evicted."""


def _chunks_msg(chunks) -> tts_pb2.SpeechChunks:
    out = tts_pb2.SpeechChunks()
    for c in chunks:
        msg = out.chunks.add(
            codes=to_proto(c.codes), sample_rate=c.sample_rate or SAMPLE_RATE, text=c.text or "",
            end_of_segment=c.end_of_segment,
        )  # fmt: skip
        if c.audio is not None:
            import torch

            msg.audio.CopyFrom(to_proto(torch.from_numpy(c.audio)))
    return out


@serve.deployment(
    name="TTSDecoder",
    max_ongoing_requests=32,
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
    request_router_config=affinity_router_config(),
)
class TTSDecoder(SessionAffinityReplica):
    def __init__(self, model_dir: str, device: str = "cpu", with_vocoder: bool = True, max_utterances: int = 64):
        from services.tts_decoder.streaming import StepBatcher
        from services.tts_decoder.streaming import TTSDecoder as Decoder

        limit_threads()
        self.device = device
        self.decoder = Decoder(model_dir, device=device, dtype=replica_dtype(device), vocoder=with_vocoder)
        self.batcher = StepBatcher(self.decoder)
        self.with_vocoder = with_vocoder
        self.utterances: dict[str, tuple[Any, float]] = {}
        self.max_utterances = max_utterances

    def _state(self, utterance_id: str):
        entry = self.utterances.get(utterance_id)
        if entry is None:
            raise UtteranceNotFound(f"utterance {utterance_id} is not active on this TTS replica")
        self.utterances[utterance_id] = (entry[0], time.monotonic())
        return entry[0]

    def _drop(self, utterance_id: str) -> bool:
        entry = self.utterances.pop(utterance_id, None)
        if entry is not None:
            self.batcher.forget(entry[0])
        return entry is not None

    async def Start(self, request: tts_pb2.StartUtteranceRequest) -> tts_pb2.StartUtteranceResponse:
        if len(self.utterances) >= self.max_utterances:  # drop the stalest (an abandoned stream)
            self._drop(min(self.utterances, key=lambda k: self.utterances[k][1]))
        # Only the speaker projection runs here (no tokenizer), so it need not wait for the batcher's worker.
        state = await off_loop(
            self.decoder.start,
            from_proto(request.spk_hidden).float(),
            greedy=request.greedy,
            seed=request.seed if request.HasField("seed") else None,
        )
        self.utterances[request.utterance_id] = (state, time.monotonic())
        return tts_pb2.StartUtteranceResponse()

    async def PushText(self, request: tts_pb2.PushTextRequest) -> tts_pb2.SpeechChunks:
        state = self._state(request.utterance_id)
        with metrics.stage_timer("tts_push"):
            return _chunks_msg(await self.batcher.push_text(state, request.text))

    async def Finish(self, request: tts_pb2.UtteranceRef) -> tts_pb2.SpeechChunks:
        state = self._state(request.utterance_id)
        try:
            with metrics.stage_timer("tts_finish"):
                return _chunks_msg(await self.batcher.finish(state))
        finally:
            self.utterances.pop(request.utterance_id, None)

    async def Cancel(self, request: tts_pb2.UtteranceRef) -> tts_pb2.CancelReply:
        return tts_pb2.CancelReply(cancelled=self._drop(request.utterance_id))

    def Stats(self, reset_peak: bool = False) -> dict[str, int]:
        """Operator view (Python handle call, not part of the gRPC contract): active utterances and the most
        utterances one batched step advanced since the replica started or the last `reset_peak`."""
        stats = {"active_utterances": len(self.utterances), "peak_batch": self.batcher.max_batch}
        if reset_peak:
            self.batcher.max_batch = 0
        return stats

    def check_health(self) -> None:
        device_alive(self.device)


@serve.deployment(
    name="Vocoder",
    max_ongoing_requests=32,
    ray_actor_options={"num_cpus": 0.25},
    health_check_period_s=10,
    request_router_config=affinity_router_config(),
)
class Vocoder(SessionAffinityReplica):
    def __init__(self, model_dir: str, device: str = "cpu", max_streams: int = 64):
        from services.tts_decoder.vocoder import Vocoder as Voc

        limit_threads()
        self.device = device
        self.vocoder = Voc(model_dir, device=device, dtype=replica_dtype(device))
        self.streams: dict[str, tuple[Any, float]] = {}
        self.max_streams = max_streams
        # Released utterance ids (unique per answer): a Decode that was in flight when the gateway released the
        # utterance may arrive after the Release and must not open a new stream. Oldest forgotten first.
        self.released: dict[str, None] = {}

    async def Decode(self, request: tts_pb2.DecodeRequest) -> tts_pb2.DecodeResponse:
        import torch

        uid = request.utterance_id
        if uid in self.released:
            return tts_pb2.DecodeResponse(audio=to_proto(torch.empty(0)), sample_rate=SAMPLE_RATE)  # no audio
        entry = self.streams.get(uid)
        if entry is None:
            if len(self.streams) >= self.max_streams:
                del self.streams[min(self.streams, key=lambda k: self.streams[k][1])]
            entry = (self.vocoder.new_stream(), time.monotonic())
        self.streams[uid] = (entry[0], time.monotonic())
        codes = from_proto(request.codes)
        # A segment end flushes the held tail but keeps the stream: the next segment's first chunk is decoded
        # with the last 4 codes before it. Only the utterance's end frees it.
        flush = request.end_of_segment or request.last
        try:
            with metrics.stage_timer("vocoder"):
                audio = await off_loop(self.vocoder.push, entry[0], codes, flush=flush)
        finally:
            if request.last:
                self.streams.pop(uid, None)
        audio = torch.as_tensor(audio, dtype=torch.float32).reshape(-1)
        return tts_pb2.DecodeResponse(audio=to_proto(audio), sample_rate=SAMPLE_RATE)

    async def Release(self, request: tts_pb2.UtteranceRef) -> tts_pb2.CancelReply:
        self.released[request.utterance_id] = None
        while len(self.released) > 16 * self.max_streams:
            del self.released[next(iter(self.released))]
        return tts_pb2.CancelReply(cancelled=self.streams.pop(request.utterance_id, None) is not None)

    def Stats(self) -> dict[str, int]:
        """Operator view (Python handle call, not part of the gRPC contract)."""
        return {"active_streams": len(self.streams)}

    def check_health(self) -> None:
        device_alive(self.device)
