"""The gateway's request pipeline: public messages -> encoder calls + prompt -> LLM stream -> text and speech.

Offline chat (upstream `chat`): images and audio go to their encoders at once; the prompt is built here from
the images' sizes and the audio lengths alone (no need to wait for the encoders); the encoders' in-flight
responses are handed straight to LLMCore, which splices them in (embeddings never pass through the gateway).
With speech on, the answer text and the `<|spk|>` hidden state go to TTSDecoder while text keeps streaming;
audio chunks are streamed as soon as each is decoded.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError

from protos.minicpmo.v1 import audio_pb2, llm_pb2, omni_pb2, tts_pb2, vision_pb2
from services.audio_encoder.processor import validate_pcm
from services.common.config import ModelConfig
from services.common.tensor_codec import to_proto
from services.gateway import metrics
from services.gateway.prompts import (
    AudioRef,
    ImageRef,
    Message,
    PlaceholderSettings,
    Prompt,
    build_chat_prompt,
    system_prompt,
)
from services.gateway.tokenizer import SpecialTokens, load_tokenizer
from services.llm_core.detokenize import IncrementalDetokenizer
from services.common.generation import CHAT_DEFAULTS, SamplingParams
from services.vision_encoder.processor import ImageProcessorConfig, load_image

SPEECH_RATE = 24000
RETRIES = 8  # owner-died retries of one stage call (backing off to ~10 s in all: a replica restart)
log = logging.getLogger("ray.serve")
_ROLES = {
    omni_pb2.ROLE_UNSPECIFIED: "user",
    omni_pb2.ROLE_USER: "user",
    omni_pb2.ROLE_ASSISTANT: "assistant",
    omni_pb2.ROLE_SYSTEM: "system",
}
MODES = {
    omni_pb2.VOICE_MODE_DEFAULT: "default",
    omni_pb2.VOICE_MODE_OMNI: "omni",
    omni_pb2.VOICE_MODE_AUDIO_ASSISTANT: "audio_assistant",
    omni_pb2.VOICE_MODE_AUDIO_ROLEPLAY: "audio_roleplay",
    omni_pb2.VOICE_MODE_VOICE_CLONING: "voice_cloning",
}
_FINISH = {
    llm_pb2.STOP_REASON_EOS: omni_pb2.FINISH_REASON_STOP,
    llm_pb2.STOP_REASON_LENGTH: omni_pb2.FINISH_REASON_LENGTH,
    llm_pb2.STOP_REASON_INTERRUPTED: omni_pb2.FINISH_REASON_INTERRUPTED,
}


class InvalidRequest(ValueError):
    """A request that is malformed as sent (INVALID_ARGUMENT)."""


class LimitExceeded(Exception):
    """A request or session over this server's limits (RESOURCE_EXHAUSTED); the message names the limit."""


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 8192  # upstream resets live sessions at 8192 tokens; a chat prompt gets the same
    max_new_tokens: int = 2048
    max_messages: int = 64
    max_images: int = 16
    max_audio_seconds: float = 120.0  # per request (chat) / per AppendUnit call (live)
    max_frames_per_append: int = 32
    max_text_chars: int = 32768
    max_session_tokens: int = 8192
    session_idle_ttl_s: int = 600


@dataclass
class Stages:
    """Handles of the downstream deployments (vocoder None when it runs inside TTSDecoder)."""

    vision: Any
    audio: Any
    llm: Any
    tts: Any
    vocoder: Any = None


class Piece:
    """An encoder call whose response an LLMCore call takes as an argument (embeddings go encoder -> LLMCore
    directly). It starts at once; a retried LLMCore call asks the encoder again, since the first response may be
    the very failure that failed the call (the encoder replica died before replying). Asking again is safe:
    offline encoding is stateless and a streaming chunk carries a request id its replica recognises."""

    def __init__(self, call: Callable[[], Any]):
        self.call = call
        self.response = call()

    def again(self) -> Any:
        self.response = self.call()
        return self.response


def request_id() -> str:
    """Id of one logged stage request, the same on each retry (the stages answer a repeat without reapplying)."""
    return uuid.uuid4().hex


# --- request parsing --------------------------------------------------------------------------------------------


def decode_pcm(audio: omni_pb2.Audio, max_seconds: float) -> np.ndarray:
    """Public Audio message -> mono float32 16 kHz (validated, resampled)."""
    if audio.sample_rate <= 0:
        raise InvalidRequest("audio.sample_rate is required (samples per second of audio.pcm, e.g. 16000)")
    if audio.format == omni_pb2.SAMPLE_FORMAT_INT16:
        if len(audio.pcm) % 2:
            raise InvalidRequest("int16 audio.pcm has an odd number of bytes")
        raw = np.frombuffer(audio.pcm, dtype="<i2")
    else:
        if len(audio.pcm) % 4:
            raise InvalidRequest("float32 audio.pcm length is not a multiple of 4 bytes (set audio.format for int16)")
        raw = np.frombuffer(audio.pcm, dtype="<f4")
    return validate_pcm(raw, audio.sample_rate, max_seconds=max_seconds)


@dataclass
class ParsedChat:
    messages: list[Message]
    images: list[bytes]  # encoded files, prompt order
    clips: list[np.ndarray]  # one joined clip per message with audio (upstream merges a message's audios)
    omni_input: bool
    max_slice_nums: int | None
    audio_seconds: float = 0.0


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


def sampling_params(opts: omni_pb2.GenerationOptions, base: SamplingParams, limits: Limits) -> SamplingParams:
    s = opts.sampling
    changes: dict[str, Any] = {"greedy": s.greedy}
    if s.greedy:
        changes["repetition_penalty"] = 1.0  # upstream's greedy runs pass 1.0 explicitly
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        if s.HasField(name):
            changes[name] = getattr(s, name)
    if opts.max_new_tokens < 0 or opts.min_new_tokens < 0:
        raise InvalidRequest("max_new_tokens and min_new_tokens must be >= 0")
    if opts.max_new_tokens > limits.max_new_tokens:
        raise LimitExceeded(f"max_new_tokens {opts.max_new_tokens} is over this server's limit of {limits.max_new_tokens}")
    changes["max_new_tokens"] = opts.max_new_tokens or min(base.max_new_tokens, limits.max_new_tokens)
    changes["min_new_tokens"] = opts.min_new_tokens
    return base.with_(**changes)


def sampling_msg(p: SamplingParams) -> llm_pb2.SamplingParams:
    msg = llm_pb2.SamplingParams(
        greedy=p.greedy, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
        repetition_penalty=p.repetition_penalty, min_new_tokens=p.min_new_tokens, max_new_tokens=p.max_new_tokens,
    )  # fmt: skip
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def prefill_input(prompt: Prompt, start: int = 0, end: int | None = None) -> llm_pb2.PrefillInput:
    """The prompt rows [start, end) with their placeholder spans (relative to `start`)."""
    end = len(prompt.input_ids) if end is None else end
    inp = llm_pb2.PrefillInput(input_ids=prompt.input_ids[start:end])
    for bounds, spans in ((prompt.image_bounds, inp.image_spans), (prompt.audio_bounds, inp.audio_spans)):
        for s, e in bounds:
            if start <= s and e <= end:
                spans.add(start=s - start, end=e - start)
            elif s < end and e > start:
                raise InvalidRequest("a placeholder straddles the prompt split")  # never happens for our splits
    return inp


class Pipeline:
    def __init__(self, model_dir: str, stages: Stages, limits: Limits = Limits()):
        self.cfg = ModelConfig.from_model_dir(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.sp = SpecialTokens.from_tokenizer(self.tokenizer)
        # ids that end the answer or close its speech: never part of the answer text
        self.unspoken_ids = (self.sp.im_end, self.sp.endoftext, self.sp.tts_eos)
        self.image_cfg = ImageProcessorConfig.from_model_dir(model_dir)
        self.stages = stages
        self.limits = limits

    # --- parsing ------------------------------------------------------------------------------------------------

    def image_ref(self, data: bytes, index: int) -> ImageRef:
        image = load_image(data, self.image_cfg.max_pixels)  # validates (corrupt, too big) before any stage runs
        return ImageRef(size_wh=image.size, key=index)

    def parse_chat(self, request: omni_pb2.ChatRequest) -> ParsedChat:
        lim = self.limits
        if not request.messages:
            raise InvalidRequest("messages is empty: send at least one user message")
        if len(request.messages) > lim.max_messages:
            raise LimitExceeded(f"{len(request.messages)} messages; the limit is {lim.max_messages}")
        has_video = any(p.WhichOneof("part") == "video" for m in request.messages for p in m.content)
        messages: list[Message] = []
        images: list[bytes] = []
        clips: list[np.ndarray] = []
        seconds = 0.0
        if request.voice_mode != omni_pb2.VOICE_MODE_UNSPECIFIED:
            ref = None
            if request.reference_voice.pcm:
                pcm = decode_pcm(request.reference_voice, lim.max_audio_seconds)
                ref = AudioRef(pcm.shape[0])
                clips.append(pcm)
                seconds += pcm.shape[0] / 16000
            messages.append(system_prompt(MODES[request.voice_mode], request.language or "en", ref))
        for i, m in enumerate(request.messages):
            content: list[Any] = []
            audio_parts: list[np.ndarray] = []
            for part in m.content:
                kind = part.WhichOneof("part")
                if kind == "text":
                    if len(part.text) > lim.max_text_chars:
                        raise LimitExceeded(f"message {i}: text of {len(part.text)} chars; limit {lim.max_text_chars}")
                    content.append(part.text)
                elif kind == "image":
                    content.append(self.image_ref(part.image.data, len(images)))
                    images.append(part.image.data)
                elif kind == "audio":
                    pcm = decode_pcm(part.audio, lim.max_audio_seconds)
                    content.append(AudioRef(pcm.shape[0]))
                    audio_parts.append(pcm)
                elif kind == "video":
                    self._expand_video(part.video, content, images, audio_parts)
                else:
                    raise InvalidRequest(f"message {i}: empty content part (set text, image, audio or video)")
            if not content:
                raise InvalidRequest(f"message {i} has no content")
            if audio_parts:
                clips.append(np.concatenate(audio_parts))
                seconds += clips[-1].shape[0] / 16000
            messages.append(Message(_ROLES.get(m.role, "user"), content))
        if len(images) > lim.max_images:
            raise LimitExceeded(f"{len(images)} images (video frames count); the limit is {lim.max_images}")
        if seconds > lim.max_audio_seconds:
            raise LimitExceeded(f"{seconds:.1f} s of audio; the limit is {lim.max_audio_seconds:g} s per request")
        max_slices = 1 if has_video else (request.max_slice_nums or None)
        if max_slices is not None and not 1 <= max_slices <= self.image_cfg.max_slice_nums:
            raise InvalidRequest(f"max_slice_nums must be in 1..{self.image_cfg.max_slice_nums}, got {max_slices}")
        return ParsedChat(messages, images, clips, has_video, max_slices, seconds)

    def _expand_video(self, video: omni_pb2.Video, content: list, images: list[bytes], audio_parts: list) -> None:
        """1 s units as upstream's video example: `<unit>`, frame i, audio second i."""
        if not video.frames:
            raise InvalidRequest("video has no frames (send one frame per second)")
        pcm = decode_pcm(video.audio, self.limits.max_audio_seconds) if video.audio.pcm else np.zeros(0, np.float32)
        for i, frame in enumerate(video.frames):
            content.append("<unit>")
            content.append(self.image_ref(frame.data, len(images)))
            images.append(frame.data)
            second = pcm[16000 * i : 16000 * (i + 1)]
            if second.shape[0]:
                content.append(AudioRef(second.shape[0]))
                audio_parts.append(second)

    def chat_prompt(self, parsed: ParsedChat, speech: bool) -> Prompt:
        settings = PlaceholderSettings.chat(
            self.image_cfg, parsed.max_slice_nums, use_image_id=False if parsed.omni_input else None
        )
        prompt = build_chat_prompt(
            parsed.messages, self.tokenizer, omni_input=parsed.omni_input, use_tts_template=speech, settings=settings
        )
        if len(prompt) > self.limits.max_prompt_tokens:
            raise LimitExceeded(
                f"the prompt is {len(prompt)} tokens; the limit is {self.limits.max_prompt_tokens} (send less input)"
            )
        return prompt

    # --- offline chat -------------------------------------------------------------------------------------------

    def encode_offline(self, parsed: ParsedChat) -> list[Piece]:
        """Start the encoders (concurrently); their in-flight responses go straight to LLMCore."""
        pieces = []
        if parsed.images:
            image_req = vision_pb2.EncodeImagesRequest(images=parsed.images, max_slice_nums=parsed.max_slice_nums or 0)
            pieces.append(Piece(partial(self.stages.vision.Encode.remote, image_req)))
        if parsed.clips:
            audio_req = audio_pb2.EncodeAudioRequest(clips=[to_proto(torch.from_numpy(c)) for c in parsed.clips])
            pieces.append(Piece(partial(self.stages.audio.Encode.remote, audio_req)))
        return pieces

    async def chat(self, request: omni_pb2.ChatRequest) -> AsyncIterator[omni_pb2.ChatEvent]:
        stats = AnswerStats(started=time.perf_counter())
        speech = request.options.speech.enabled
        parsed = self.parse_chat(request)
        params = sampling_params(request.options, CHAT_DEFAULTS, self.limits)
        prompt = self.chat_prompt(parsed, speech)
        pieces = self.encode_offline(parsed)
        spk = prompt.spk_bounds[-1][0] if speech and prompt.spk_bounds else -1
        gen = llm_pb2.GenerateRequest(
            session_id=f"chat-{uuid.uuid4().hex}",
            input=prefill_input(prompt),
            sampling=sampling_msg(params),
            spk_position=spk,
            ephemeral=True,
        )
        stats.prompt_tokens = len(prompt)
        async for event in self.answer(gen, pieces, request.options.speech if speech else None, stats):
            yield event

    # --- answers (Chat and Respond) ---------------------------------------------------------------------------

    def llm_for(self, session_id: str):
        return self.stages.llm.options(session_id=session_id)

    async def call_llm(self, session_id: str, method: str, request, *pieces: Piece):
        """A unary LLMCore call routed to the session's owner. A call that fails because the owner (or an
        encoder feeding it) died is retried (Serve does not): the retry lands on the owner's replacement, which
        rebuilds the session from its replay log first. The retry is the same request (same `request_id`), so
        one the old owner logged before dying is recognised and not applied twice."""
        delay = 0.05
        for attempt in range(RETRIES):
            args = [p.response if attempt == 0 else p.again() for p in pieces]
            try:
                return await getattr(self.llm_for(session_id), method).remote(request, *args)
            except (ActorDiedError, ActorUnavailableError) as e:
                if attempt == RETRIES - 1:
                    raise
                log.warning("LLMCore %s of %s failed (%s); retrying on the new owner", method, session_id, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def answer(
        self,
        gen: llm_pb2.GenerateRequest,
        pieces: Sequence[Piece],
        speech: omni_pb2.SpeechOptions | None,
        stats: AnswerStats,
        utterance: str | None = None,
    ) -> AsyncIterator[omni_pb2.ChatEvent]:
        """Stream one answer: text deltas as tokens arrive; with speech, audio chunks as the TTS produces them."""
        utterance = utterance or gen.session_id
        out: asyncio.Queue[omni_pb2.ChatEvent | BaseException | None] = asyncio.Queue()
        text_q: asyncio.Queue[str | None] = asyncio.Queue()
        spk_ready: asyncio.Future = asyncio.get_running_loop().create_future()
        tasks = [asyncio.create_task(self._run_llm(gen, pieces, stats, out, text_q if speech else None, spk_ready))]
        if speech is not None:
            tasks.append(asyncio.create_task(self._run_tts(utterance, speech, stats, out, text_q, spk_ready)))
        done = asyncio.gather(*tasks, return_exceptions=True)
        done.add_done_callback(lambda f: out.put_nowait(None))
        try:
            while True:
                item = await out.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
            errors = [r for r in done.result() if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
        finally:
            for t in tasks:
                t.cancel()
        yield self._final(stats)

    async def _run_llm(self, gen, pieces, stats: AnswerStats, out: asyncio.Queue, text_q, spk_ready) -> None:
        detok = IncrementalDetokenizer(self.tokenizer, drop_ids=self.unspoken_ids)
        try:
            async for ev in self._generate_events(gen, pieces):
                if ev.HasField("spk_hidden") and not spk_ready.done():
                    spk_ready.set_result(ev.spk_hidden)
                for tok in ev.token_ids:
                    if stats.first_token is None:
                        stats.first_token = time.perf_counter()
                        metrics.TTFT.observe(stats.first_token - stats.started)
                    stats.token_ids.append(tok)
                    delta = detok.push([tok])
                    if delta:
                        stats.text += delta
                        out.put_nowait(omni_pb2.ChatEvent(text_delta=delta))
                        if text_q is not None:
                            text_q.put_nowait(delta)
                if ev.stop:
                    stats.finish = _FINISH[ev.stop]
                    stats.kv_len = ev.kv_len
            tail = detok.finish()
            if tail:
                stats.text += tail
                out.put_nowait(omni_pb2.ChatEvent(text_delta=tail))
                if text_q is not None:
                    text_q.put_nowait(tail)
        finally:
            if not spk_ready.done():
                spk_ready.set_result(None)
            if text_q is not None:
                text_q.put_nowait(None)

    async def _generate_events(
        self, gen: llm_pb2.GenerateRequest, pieces: Sequence[Piece]
    ) -> AsyncIterator[llm_pb2.GenerateEvent]:
        """LLMCore's token stream; retried on the owner's replacement if the owner died before the first event
        (an answer the old owner already logged is streamed again from the log: same `request_id`)."""
        delay = 0.05
        for attempt in range(RETRIES):
            started = False
            args = [p.response if attempt == 0 else p.again() for p in pieces]
            try:
                async for ev in self.llm_for(gen.session_id).Generate.options(stream=True).remote(gen, *args):
                    started = True
                    yield ev
                return
            except (ActorDiedError, ActorUnavailableError) as e:
                if started or attempt == RETRIES - 1:
                    raise
                log.warning("LLMCore Generate of %s failed (%s); retrying on the new owner", gen.session_id, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _run_tts(self, utterance: str, speech, stats: AnswerStats, out: asyncio.Queue, text_q, spk_ready) -> None:
        spk = await spk_ready
        if spk is None:  # the LLM failed before its first event; its error is reported
            return
        with_audio = speech.output != omni_pb2.SPEECH_OUTPUT_CODES
        with_codes = speech.output in (omni_pb2.SPEECH_OUTPUT_CODES, omni_pb2.SPEECH_OUTPUT_BOTH)
        tts = self.stages.tts.options(session_id=utterance)
        start = tts_pb2.StartUtteranceRequest(utterance_id=utterance, spk_hidden=spk, greedy=speech.greedy)
        if speech.HasField("seed"):
            start.seed = speech.seed
        await tts.Start.remote(start)
        index = 0
        finished = False
        spoken = False  # an answer of only end tokens has nothing to speak: no Finish then
        try:
            while not finished:
                text = await text_q.get()
                parts = [] if text is None else [text]
                while not text_q.empty():  # coalesce what arrived while the TTS was busy
                    nxt = text_q.get_nowait()
                    if nxt is None:
                        text = None
                        break
                    parts.append(nxt)
                if text is None:
                    finished = True
                if parts:
                    spoken = True
                    chunks = await tts.PushText.remote(tts_pb2.PushTextRequest(utterance_id=utterance, text="".join(parts)))
                    index = await self._emit_speech(utterance, chunks, index, False, with_audio, with_codes, stats, out)
                if finished and spoken and stats.finish != omni_pb2.FINISH_REASON_INTERRUPTED:
                    chunks = await tts.Finish.remote(tts_pb2.UtteranceRef(utterance_id=utterance))
                    index = await self._emit_speech(utterance, chunks, index, True, with_audio, with_codes, stats, out)
                    return
        except BaseException:
            await self._release_utterance(tts, utterance)
            raise
        await self._release_utterance(tts, utterance)  # interrupted or silent: free it

    async def _release_utterance(self, tts, utterance: str) -> None:
        """Free an utterance that will get no Finish: its TTS state and, when separate, its vocoder stream."""
        ref = tts_pb2.UtteranceRef(utterance_id=utterance)
        await tts.Cancel.remote(ref)
        if self.stages.vocoder is not None:
            await self.stages.vocoder.options(session_id=utterance).Release.remote(ref)

    async def _emit_speech(self, utterance, chunks: tts_pb2.SpeechChunks, index, last, with_audio, with_codes, stats, out) -> int:
        items = list(chunks.chunks)
        for i, c in enumerate(items):
            audio = c.audio
            if with_audio and self.stages.vocoder is not None:  # vocoder as its own deployment
                voc = self.stages.vocoder.options(session_id=utterance)
                dec = await voc.Decode.remote(
                    tts_pb2.DecodeRequest(
                        utterance_id=utterance, codes=c.codes, end_of_segment=c.end_of_segment,
                        last=last and i == len(items) - 1,
                    )  # fmt: skip
                )
                audio = dec.audio
            event = omni_pb2.AudioChunk(sample_rate=c.sample_rate or SPEECH_RATE, index=index, text=c.text)
            n_codes = c.codes.shape[0] if c.codes.shape else 0
            stats.speech_codes += n_codes
            if with_audio and audio.data:
                event.pcm = audio.data  # float32 little-endian already: no re-encode
                stats.audio_samples += len(audio.data) // 4
            if with_codes:
                event.codes.CopyFrom(c.codes)
            if not event.pcm and not event.HasField("codes"):
                continue
            if stats.first_audio is None:
                stats.first_audio = time.perf_counter()
                metrics.TTFA.observe(stats.first_audio - stats.started)
            out.put_nowait(omni_pb2.ChatEvent(audio=event))
            index += 1
        return index

    def _final(self, stats: AnswerStats) -> omni_pb2.ChatEvent:
        now = time.perf_counter()
        ms = lambda t: 0.0 if t is None else (t - stats.started) * 1000.0  # noqa: E731
        audio_s = stats.audio_samples / SPEECH_RATE
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
