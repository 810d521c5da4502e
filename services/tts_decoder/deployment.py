"""Ray Serve deployments `TTSDecoder` (ConditionalChatTTS, optionally with DVAE + Vocos) and `Vocoder` (DVAE +
Vocos alone, for when the vocoder should scale apart from the TTS backbone).

An utterance lives in the TTSDecoder replica that speaks it (session affinity on its id) from `Speak` to the end
of its stream. Its text arrives by `PushText` and is spoken in order; every chunk streams out of `Speak` as soon
as it is decoded. Chunks carry their 4-codebook codes beside the audio. With a separate `Vocoder` deployment the
TTSDecoder calls it itself, from one task per utterance, so the TTS goes on generating the next chunk while the
vocoder decodes the last one (the gateway never relays speech between them); codes-only utterances never reach
a vocoder.

Concurrent utterances on one replica share forward passes: every text push goes through one `StepBatcher`,
which advances all utterances with work by one chunk per batched step. The Vocoder batches the concurrent
utterances' chunks (`services.runtime.batching.Batcher`) into one DVAE + Vocos pass.

Utterances whose speaker went away (a gateway replica died mid-answer: nobody reads the stream or pushes text)
are dropped by a sweep after `idle_timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from ray import serve

from protos.minicpmo.v1 import tts_pb2
from services.common.audio import SPEECH_SAMPLE_RATE
from services.common.tensor_codec import from_proto, to_proto
from services.runtime import metrics
from services.runtime.batching import Batcher, result_of
from services.runtime.replica import (detached, device_alive, limit_threads, off_loop, replica_dtype,
                                      reports_startup, with_own_transport)
from services.runtime.routing import SessionAffinityReplica
from services.tts_decoder.streaming import SpeechChunk, SpeechDecoder, StepBatcher
from services.tts_decoder.text import EmptyTextError
from services.tts_decoder.vocoder import WaveDecoder

log = logging.getLogger("ray.serve")
_END = object()  # end of an utterance's text


@dataclass(eq=False)
class _Utterance:
    """One utterance on this replica: text in, chunks out, and the tasks between them."""

    text: asyncio.Queue = field(default_factory=asyncio.Queue)  # str pieces, then _END
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # SpeechChunk messages, an exception, then None
    tasks: list[asyncio.Task] = field(default_factory=list)
    state: object | None = None  # the decoder's UtteranceState once Speak started it
    active_at: float = field(default_factory=time.monotonic)


def _chunk_msg(c: SpeechChunk, audio: torch.Tensor | None) -> tts_pb2.SpeechChunk:
    msg = tts_pb2.SpeechChunk(codes=to_proto(c.codes), sample_rate=SPEECH_SAMPLE_RATE, text=c.text or "",
                              end_of_segment=c.end_of_segment)  # fmt: skip
    if audio is not None:
        msg.audio.CopyFrom(to_proto(audio))
    return msg


@serve.deployment(name="TTSDecoder")
class TTSDecoder(SessionAffinityReplica):
    @reports_startup
    def __init__(self, model_dir: str, device: str = "cpu", vocoder=None, idle_timeout_s: float = 60.0,
                 max_utterances: int = 32):
        """`vocoder`: a handle of the Vocoder deployment, or None to run DVAE + Vocos in this replica.
        `max_utterances`: KV slots, allocated at start (146 MB each in bf16 at the real config); one more
        concurrent utterance is refused with RESOURCE_EXHAUSTED."""
        limit_threads()
        self.device = device
        self.decoder = SpeechDecoder.from_checkpoint(model_dir, device=device, dtype=replica_dtype(device),
                                                     vocoder=vocoder is None, max_utterances=max_utterances)
        self.batcher = StepBatcher(self.decoder)
        self.vocoder = with_own_transport(vocoder) if vocoder is not None else None
        self.idle_timeout_s = idle_timeout_s
        self.utterances: dict[str, _Utterance] = {}
        self._sweeper: asyncio.Task | None = None

    def _utterance(self, utterance_id: str) -> _Utterance:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep())
        u = self.utterances.setdefault(utterance_id, _Utterance())
        u.active_at = time.monotonic()
        return u

    async def Speak(self, request: tts_pb2.StartUtteranceRequest) -> AsyncIterator[tts_pb2.SpeechChunk]:
        uid = request.utterance_id
        u = self._utterance(uid)
        seed = request.seed if request.HasField("seed") else None
        try:
            # Only the speaker projection runs here (no tokenizer), so it need not wait for the batcher's worker.
            u.state = await off_loop(self.decoder.start, from_proto(request.spk_hidden).float(), request.greedy, seed,
                                     request.with_audio and self.vocoder is None)
            to_vocode: asyncio.Queue = asyncio.Queue()
            remote_audio = self.vocoder is not None and request.with_audio
            u.tasks.append(asyncio.create_task(self._generate(u, to_vocode if remote_audio else u.out)))
            if remote_audio:
                u.tasks.append(asyncio.create_task(self._vocode(uid, to_vocode, u.out)))
            while (item := await u.out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                u.active_at = time.monotonic()
                yield item
        finally:
            self._end(uid)

    async def PushText(self, request: tts_pb2.PushTextRequest) -> tts_pb2.PushTextReply:
        self._utterance(request.utterance_id).text.put_nowait(request.text)
        return tts_pb2.PushTextReply()

    async def Finish(self, request: tts_pb2.UtteranceRef) -> tts_pb2.PushTextReply:
        self._utterance(request.utterance_id).text.put_nowait(_END)
        return tts_pb2.PushTextReply()

    async def Cancel(self, request: tts_pb2.UtteranceRef) -> tts_pb2.CancelReply:
        u = self.utterances.get(request.utterance_id)
        if u is not None:
            u.out.put_nowait(None)  # the Speak stream ends; its `finally` frees the utterance
        return tts_pb2.CancelReply(cancelled=u is not None)

    async def _generate(self, u: _Utterance, sink: asyncio.Queue) -> None:
        """Text in order -> batched TTS steps -> chunks (with inline audio when this replica vocodes)."""
        try:
            ended = False
            spoken = False
            while not ended:
                parts = [await u.text.get()]
                while not u.text.empty():  # coalesce what arrived while the TTS was busy
                    parts.append(u.text.get_nowait())
                ended = parts[-1] is _END
                text = "".join(p for p in parts if p is not _END)
                chunks: list[SpeechChunk] = []
                if text:
                    spoken = True
                    with metrics.stage_timer("tts_push"):
                        chunks += await self.batcher.push_text(u.state, text)
                if ended and spoken:
                    with metrics.stage_timer("tts_finish"):
                        try:
                            chunks += await self.batcher.finish(u.state)
                        except EmptyTextError:  # the answer's text holds nothing speakable: no speech, no error
                            pass
                for i, c in enumerate(chunks):
                    last = ended and i == len(chunks) - 1
                    if sink is u.out:
                        audio = torch.from_numpy(c.audio) if c.audio is not None else None
                        sink.put_nowait(_chunk_msg(c, audio))
                    else:
                        sink.put_nowait((c, last))
                if ended and sink is not u.out:
                    sink.put_nowait(None)
            if sink is u.out:
                sink.put_nowait(None)
        except Exception as e:  # ends the Speak stream with this error
            u.out.put_nowait(e)

    async def _vocode(self, uid: str, chunks: asyncio.Queue, out: asyncio.Queue) -> None:
        """The Vocoder deployment decodes this utterance's chunks, one at a time and in order, while the TTS
        goes on; its stream is released once the last chunk (or a cancel) is through."""
        vocoder = self.vocoder.options(session_id=uid)
        ref = tts_pb2.UtteranceRef(utterance_id=uid)
        try:
            while (item := await chunks.get()) is not None:
                c, last = item
                req = tts_pb2.DecodeRequest(utterance_id=uid, codes=to_proto(c.codes), last=last,
                                            end_of_segment=c.end_of_segment)  # fmt: skip
                with metrics.stage_timer("vocoder_call"):
                    dec = await detached(vocoder.Decode.remote, req)
                out.put_nowait(_chunk_msg(c, from_proto(dec.audio)))
            out.put_nowait(None)
        except Exception as e:  # ends the Speak stream with this error
            out.put_nowait(e)
        finally:
            asyncio.get_running_loop().create_task(_release(vocoder, ref))

    def _end(self, utterance_id: str) -> None:
        u = self.utterances.pop(utterance_id, None)
        if u is None:
            return
        for t in u.tasks:
            t.cancel()
        if u.state is not None:
            self.batcher.forget(u.state)

    async def _sweep(self) -> None:
        """Drop utterances nobody reads or feeds any more (their gateway went away mid-answer)."""
        while True:
            await asyncio.sleep(self.idle_timeout_s / 4)
            now = time.monotonic()
            for uid, u in list(self.utterances.items()):
                if now - u.active_at > self.idle_timeout_s:
                    log.info("dropping idle utterance %s", uid)
                    u.out.put_nowait(None)
                    self._end(uid)

    def Stats(self, reset_peak: bool = False) -> dict[str, int]:
        """Operator view (Python handle call, not part of the gRPC contract): active utterances and the most
        utterances one batched step advanced since the replica started or the last `reset_peak`."""
        stats = {"active_utterances": len(self.utterances), "peak_batch": self.batcher.max_batch}
        if reset_peak:
            self.batcher.max_batch = 0
        return stats

    def check_health(self) -> None:
        device_alive(self.device)


async def _release(vocoder, ref: tts_pb2.UtteranceRef) -> None:
    try:
        await asyncio.wait_for(detached(vocoder.Release.remote, ref), 3.0)
    except Exception:  # the Vocoder's idle sweep frees the stream anyway
        pass


@serve.deployment(name="Vocoder")
class Vocoder(SessionAffinityReplica):
    @reports_startup
    def __init__(self, model_dir: str, device: str = "cpu", idle_timeout_s: float = 60.0):
        limit_threads()
        self.device = device
        self.vocoder = WaveDecoder.from_checkpoint(model_dir, device=device, dtype=replica_dtype(device))
        self.idle_timeout_s = idle_timeout_s
        self.streams: dict[str, tuple[object, float]] = {}  # utterance id -> (VocoderStream, last used)
        self.batcher = Batcher(self._decode_many)
        self._sweeper: asyncio.Task | None = None

    async def Decode(self, request: tts_pb2.DecodeRequest) -> tts_pb2.DecodeResponse:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep())
        now = time.monotonic()
        stream = self.streams.get(request.utterance_id, (None, 0.0))[0] or self.vocoder.new_stream()
        self.streams[request.utterance_id] = (stream, now)
        with metrics.stage_timer("vocoder"):
            try:
                audio = result_of(await self.batcher.submit((stream, request)))
            finally:
                if request.last:
                    self.streams.pop(request.utterance_id, None)
        return tts_pb2.DecodeResponse(audio=to_proto(audio), sample_rate=SPEECH_SAMPLE_RATE)

    def _decode_many(self, items: list[tuple[object, tts_pb2.DecodeRequest]]) -> list[torch.Tensor]:
        """One DVAE + Vocos pass for the chunks of concurrent utterances (one chunk per utterance in flight). A
        segment end flushes the held tail but keeps the stream: the next segment's first chunk is decoded with the
        last 4 codes before it. Only the utterance's end frees it."""
        streams = [stream for stream, _ in items]
        codes = [from_proto(r.codes) for _, r in items]
        flush = [r.end_of_segment or r.last for _, r in items]
        audio = self.vocoder.push_many(streams, codes, flush)
        return [torch.as_tensor(a, dtype=torch.float32).reshape(-1) for a in audio]

    async def Release(self, request: tts_pb2.UtteranceRef) -> tts_pb2.CancelReply:
        return tts_pb2.CancelReply(cancelled=self.streams.pop(request.utterance_id, None) is not None)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.idle_timeout_s / 4)
            now = time.monotonic()
            for uid, (_, used) in list(self.streams.items()):
                if now - used > self.idle_timeout_s:
                    self.streams.pop(uid, None)

    def Stats(self) -> dict[str, int]:
        """Operator view (Python handle call, not part of the gRPC contract)."""
        return {"active_streams": len(self.streams)}

    def check_health(self) -> None:
        device_alive(self.device)
