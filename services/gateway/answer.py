"""One answer, as the client gets it (Chat and Respond): LLM tokens become text deltas; with speech on, the
text goes to the TTSDecoder as it arrives and its audio chunks stream back in the same event stream; a final
event closes it with usage and timings.

Three tasks per spoken answer: the LLM stream (tokens -> text deltas, queued for the TTS), the text pusher
(pushes what accumulated while the previous push was in flight, in order) and the speech reader (the TTS's
`Speak` stream -> audio events). The TTS calls its vocoder itself, so speech never bounces through here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from protos.minicpmo.v1 import llm_pb2, omni_pb2, tts_pb2
from services.common.audio import SPEECH_SAMPLE_RATE
from services.gateway.detokenize import IncrementalDetokenizer
from services.gateway.stages import Piece, RayStages
from services.runtime import metrics

FINISH = {
    llm_pb2.STOP_REASON_EOS: omni_pb2.FINISH_REASON_STOP,
    llm_pb2.STOP_REASON_LENGTH: omni_pb2.FINISH_REASON_LENGTH,
    llm_pb2.STOP_REASON_INTERRUPTED: omni_pb2.FINISH_REASON_INTERRUPTED,
}
_DONE = object()


@dataclass
class AnswerStats:
    started: float
    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    first_token: float | None = None
    first_audio: float | None = None
    audio_samples: int = 0
    speech_codes: int = 0
    finish: int = omni_pb2.FINISH_REASON_UNSPECIFIED
    kv_len: int = 0


class Answer:
    """Streams one answer (see the module doc). `detokenizer()` makes a fresh IncrementalDetokenizer."""

    def __init__(
        self,
        stages: RayStages,
        detokenizer: Callable[[], IncrementalDetokenizer],
        gen: llm_pb2.GenerateRequest,
        pieces: Sequence[Piece],
        speech: omni_pb2.SpeechOptions | None,
        utterance_id: str,
    ):
        self.stages = stages
        self.detok = detokenizer()
        self.gen = gen
        self.pieces = list(pieces)
        self.speech = speech
        self.utterance_id = utterance_id
        self.stats = AnswerStats(started=time.perf_counter())
        self.out: asyncio.Queue = asyncio.Queue()  # ChatEvent | BaseException | _DONE
        self.text_q: asyncio.Queue = asyncio.Queue()  # text pieces for the TTS, then None
        self.spk: asyncio.Future = asyncio.get_running_loop().create_future()  # spk hidden (Tensor) or None

    async def events(self) -> AsyncIterator[omni_pb2.ChatEvent]:
        tasks = [asyncio.create_task(self._llm())]
        if self.speech is not None:
            tasks.append(asyncio.create_task(self._speak()))
        pending = len(tasks)
        try:
            while pending:
                item = await self.out.get()
                if item is _DONE:
                    pending -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
        yield self._final()

    # --- LLM ----------------------------------------------------------------------------------------------------

    async def _llm(self) -> None:
        stats = self.stats
        try:
            async for ev in self.stages.generate(self.gen, self.pieces):
                if ev.HasField("spk_hidden") and not self.spk.done():
                    self.spk.set_result(ev.spk_hidden)
                if ev.prompt_tokens:
                    stats.prompt_tokens = ev.prompt_tokens
                for tok in ev.token_ids:
                    if stats.first_token is None:
                        stats.first_token = time.perf_counter()
                        metrics.TTFT.observe(stats.first_token - stats.started)
                    stats.token_ids.append(tok)
                    self._text(self.detok.push([tok]))
                if ev.stop:
                    stats.finish = FINISH[ev.stop]
                    stats.kv_len = ev.kv_len
            self._text(self.detok.finish())
            self.out.put_nowait(_DONE)
        except BaseException as e:
            self.out.put_nowait(e)
        finally:
            if not self.spk.done():
                self.spk.set_result(None)
            self.text_q.put_nowait(None)

    def _text(self, delta: str) -> None:
        if delta:
            self.stats.text += delta
            self.out.put_nowait(omni_pb2.ChatEvent(text_delta=delta))
            self.text_q.put_nowait(delta)

    # --- speech -------------------------------------------------------------------------------------------------

    async def _speak(self) -> None:
        speech, uid = self.speech, self.utterance_id
        pusher: asyncio.Task | None = None
        ended = False
        try:
            spk = await self.spk
            if spk is None:  # the LLM failed before its first event; its error is reported
                ended = True
                self.out.put_nowait(_DONE)
                return
            start = tts_pb2.StartUtteranceRequest(
                utterance_id=uid, spk_hidden=spk, greedy=speech.greedy,
                with_audio=speech.output != omni_pb2.SPEECH_OUTPUT_CODES,
            )  # fmt: skip
            if speech.HasField("seed"):
                start.seed = speech.seed
            stream = self.stages.speak(start)
            pusher = asyncio.create_task(self._push_text())
            with_codes = speech.output in (omni_pb2.SPEECH_OUTPUT_CODES, omni_pb2.SPEECH_OUTPUT_BOTH)
            index = 0
            async for chunk in stream:
                index = self._audio(chunk, index, with_codes)
            ended = True
            self.out.put_nowait(_DONE)
        except BaseException as e:
            self.out.put_nowait(e)
        finally:
            if pusher is not None:
                pusher.cancel()
            if not ended:  # failed or cancelled: free the utterance (in the background, bounded)
                self.stages.cancel_speech(uid)

    async def _push_text(self) -> None:
        """Text to the TTS in order; what arrives while a push is in flight goes in the next one. Only an answer
        that ended on its own is finished (spoken to the end); an interrupted one is cancelled instead. A failure
        here fails the answer."""
        try:
            await self._push_all_text()
        except Exception as e:
            self.out.put_nowait(e)

    async def _push_all_text(self) -> None:
        uid = self.utterance_id
        while True:
            parts = [await self.text_q.get()]
            while not self.text_q.empty():
                parts.append(self.text_q.get_nowait())
            text = "".join(p for p in parts if p is not None)
            if text:
                await self.stages.push_text(uid, text)
            if parts[-1] is None:
                break
        if self.stats.finish == omni_pb2.FINISH_REASON_INTERRUPTED:
            self.stages.cancel_speech(uid)
        else:
            await self.stages.finish_text(uid)

    def _audio(self, c: tts_pb2.SpeechChunk, index: int, with_codes: bool) -> int:
        stats = self.stats
        stats.speech_codes += c.codes.shape[0] if c.codes.shape else 0
        event = omni_pb2.AudioChunk(sample_rate=c.sample_rate or SPEECH_SAMPLE_RATE, index=index, text=c.text)
        if c.audio.data:
            event.pcm = c.audio.data  # float32 little-endian already: no re-encode
            stats.audio_samples += len(c.audio.data) // 4
        if with_codes:
            event.codes.CopyFrom(c.codes)
        if not event.pcm and not event.HasField("codes"):
            return index
        if stats.first_audio is None:
            stats.first_audio = time.perf_counter()
            metrics.TTFA.observe(stats.first_audio - stats.started)
        self.out.put_nowait(omni_pb2.ChatEvent(audio=event))
        return index + 1

    # --- final --------------------------------------------------------------------------------------------------

    def _final(self) -> omni_pb2.ChatEvent:
        stats = self.stats
        now = time.perf_counter()
        ms = lambda t: 0.0 if t is None else (t - stats.started) * 1000.0  # noqa: E731
        audio_s = stats.audio_samples / SPEECH_SAMPLE_RATE
        speed = 0.0
        if stats.first_audio is not None and now > stats.first_audio:
            speed = audio_s / (now - stats.first_audio)
            metrics.SPEECH_RTF.observe((now - stats.started) / audio_s if audio_s else 0.0)
        metrics.ANSWER_TOKENS.inc(len(stats.token_ids))
        final = omni_pb2.FinalEvent(
            finish_reason=stats.finish,
            text=stats.text,
            token_ids=stats.token_ids,
            usage=omni_pb2.Usage(
                prompt_tokens=stats.prompt_tokens,
                completion_tokens=len(stats.token_ids),
                speech_codes=stats.speech_codes,
                audio_seconds=audio_s,
                session_tokens=stats.kv_len,
            ),
            timings=omni_pb2.Timings(
                time_to_first_token_ms=ms(stats.first_token),
                time_to_first_audio_ms=ms(stats.first_audio),
                total_ms=ms(now),
                speech_speed=speed,
            ),
        )
        return omni_pb2.ChatEvent(final=final)

