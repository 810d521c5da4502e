"""Live sessions (upstream `streaming_prefill` / `streaming_generate`) on top of the session store and the stages.

CreateSession prefills the system prompt (with its reference voice) into a new session. AppendUnit runs the
client's audio and frames through the TDM muxer; each completed 1 s unit (`<unit>` + its latest frame + its
second of audio) is encoded at once - frame and audio concurrently, the frames of all completed units at once -
and prefilled into the session in order (each unit's encoder responses go straight into its prefill call, so
order holds however the encoders answer). Respond flushes the partial second, prefills the assistant prefix and
streams the answer; Interrupt stops it on the LLM replica that owns the session.

State: the record, turn state, leases and replay log are in Redis (`SessionStore`); the KV and the streaming
Whisper state are in the replicas that own them; only the partial second of audio not yet cut into a unit lives
here (calls that carry `session_id` metadata stick to this gateway replica).
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass, field
from functools import partial

import torch

from protos.minicpmo.v1 import audio_pb2, llm_pb2, omni_pb2, vision_pb2
from services.common.tensor_codec import to_proto
from services.gateway import metrics
from services.gateway.pipeline import (
    MODES,
    AnswerStats,
    InvalidRequest,
    LimitExceeded,
    Piece,
    Pipeline,
    decode_pcm,
    prefill_input,
    request_id,
    sampling_msg,
    sampling_params,
)
from services.gateway.prompts import (
    AudioRef,
    Message,
    PlaceholderSettings,
    StreamingPromptState,
    assistant_prefix,
    build_streaming_prefill,
    system_prompt,
)
from services.gateway.sessions import SessionRecord
from services.gateway.stage import session_store
from services.gateway.tdm import TDMMuxer, Unit
from services.common.generation import STREAMING_DEFAULTS


_MODE_NAMES = {v: k for k, v in MODES.items()}
_STATES = {
    "idle": omni_pb2.SESSION_STATE_IDLE,
    "user_turn": omni_pb2.SESSION_STATE_LISTENING,
    "answering": omni_pb2.SESSION_STATE_RESPONDING,
    "answered": omni_pb2.SESSION_STATE_IDLE,
    "interrupted": omni_pb2.SESSION_STATE_IDLE,
}


def prompt_state(previous_turn: str) -> StreamingPromptState:
    """The upstream prompt flags of a session whose turn state was `previous_turn` before this input."""
    return StreamingPromptState(
        started=True,
        new_user_msg=previous_turn != "user_turn",
        generated=previous_turn in ("answered", "interrupted"),
        completed=previous_turn == "answered",
    )


@dataclass
class _Local:
    """What this gateway replica keeps of a session: the muxer and a lock ordering the session's appends."""

    muxer: TDMMuxer = field(default_factory=TDMMuxer)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    units: int = 0


class LiveSessions:
    def __init__(self, pipeline: Pipeline, redis_url: str):
        lim = pipeline.limits
        self.pipeline = pipeline
        self.store = session_store(redis_url, ttl_s=lim.session_idle_ttl_s, max_tokens=lim.max_session_tokens)
        self.settings = PlaceholderSettings.streaming(pipeline.image_cfg)
        self.local: dict[str, _Local] = {}
        self._sweeper: asyncio.Task | None = None

    @property
    def stages(self):
        return self.pipeline.stages

    async def store_healthy(self) -> bool:
        try:
            return bool(await self.store.client.ping())
        except Exception:
            return False

    def _local(self, sid: str) -> _Local:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep())
        if sid not in self.local:
            self.local[sid] = _Local()
            metrics.ACTIVE_SESSIONS.set(len(self.local))
        return self.local[sid]

    async def _sweep(self, period_s: float = 15.0) -> None:
        """Forget the muxers of sessions whose record expired (or was closed through another replica)."""
        while True:
            await asyncio.sleep(period_s)
            try:
                for sid in await self.store.missing(list(self.local)):
                    self.local.pop(sid, None)
                metrics.ACTIVE_SESSIONS.set(len(self.local))
            except Exception:  # Redis blip: next period
                continue

    # --- create ---------------------------------------------------------------------------------------------------

    async def create(self, caller: str, request: omni_pb2.CreateSessionRequest) -> omni_pb2.SessionInfo:
        mode_id = request.mode or omni_pb2.VOICE_MODE_OMNI
        if mode_id not in MODES:
            raise InvalidRequest(f"unknown session mode {request.mode}")
        language = request.language or "en"
        if language not in ("en", "zh"):
            raise InvalidRequest(f"language must be 'en' or 'zh', got {language!r}")
        # Validate the options now rather than at the first Respond.
        sampling_params(request.options, STREAMING_DEFAULTS, self.pipeline.limits)
        ref = decode_pcm(request.reference_voice, self.pipeline.limits.max_audio_seconds) if request.reference_voice.pcm else None
        msg = system_prompt(MODES[mode_id], language, AudioRef(ref.shape[0]) if ref is not None else None)
        options = {"generation": base64.b64encode(request.options.SerializeToString()).decode()}
        record = await self.store.create(caller, MODES[mode_id], language, options)
        sid = record.session_id
        try:
            # The system prompt starts the session (upstream: a new session id, rendered with the TTS template);
            # its audio goes through a throwaway Whisper stream, as upstream drops that cache afterwards.
            prompt = build_streaming_prefill(msg, StreamingPromptState(), self.pipeline.tokenizer, settings=self.settings)
            pieces = []
            if ref is not None:
                chunk = audio_pb2.EncodeChunkRequest(session_id=sid, pcm=to_proto(torch.from_numpy(ref)), fresh=True)
                pieces.append(Piece(partial(self.stages.audio.EncodeChunk.remote, chunk)))
            await self._prefill(sid, prompt, pieces)
        except BaseException:
            await self._forget(sid)
            raise
        return await self.info(caller, sid)

    # --- append ---------------------------------------------------------------------------------------------------

    async def append(self, caller: str, request: omni_pb2.AppendUnitRequest) -> omni_pb2.AppendUnitResponse:
        sid = request.session_id
        await self.store.get_owned(sid, caller)
        lim = self.pipeline.limits
        if len(request.frames) > lim.max_frames_per_append:
            raise LimitExceeded(f"{len(request.frames)} frames in one call; the limit is {lim.max_frames_per_append}")
        if len(request.text) > lim.max_text_chars:
            raise LimitExceeded(f"text of {len(request.text)} chars; the limit is {lim.max_text_chars}")
        pcm = decode_pcm(request.audio, lim.max_audio_seconds) if request.audio.pcm else None
        frames = [(f.data, self.pipeline.image_ref(f.data, i)) for i, f in enumerate(request.frames)]
        if pcm is None and not frames and not request.text:
            raise InvalidRequest("AppendUnit carries nothing: send audio, frames or text")
        local = self._local(sid)
        async with local.lock:  # one session's inputs enter its KV in arrival order
            for data, ref in frames:
                local.muxer.push_frame((data, ref))
            units = local.muxer.push_audio(pcm) if pcm is not None else []
            n = await self._prefill_units(sid, units)
            if request.text:
                await self._prefill_text(sid, request.text)
            record = await self.store.get(sid)
        return omni_pb2.AppendUnitResponse(
            units_prefilled=n,
            pending_audio_ms=local.muxer.pending_samples * 1000 // 16000,
            token_count=record.tokens,
        )

    async def _user_prompt(self, sid: str, content: list):
        prev = await self.store.set_turn(sid, "user_turn")
        return build_streaming_prefill(
            Message("user", content), prompt_state(prev), self.pipeline.tokenizer, settings=self.settings
        )

    async def _prefill_units(self, sid: str, units: list[Unit]) -> int:
        if not units:
            return 0
        # All frames of these units go to the vision encoder at once; audio follows the session's stream order.
        encode_frame = self.stages.vision.Encode.remote
        vision = [
            Piece(partial(encode_frame, vision_pb2.EncodeImagesRequest(images=[u.frame[0]], max_slice_nums=1)))
            if u.frame is not None else None
            for u in units
        ]  # fmt: skip
        audio_h = self.stages.audio.options(session_id=sid)
        for unit, vis in zip(units, vision):
            content: list = ["<unit>"]
            pieces = []
            if unit.frame is not None:
                content.append(unit.frame[1])
                pieces.append(vis)
            if unit.audio.shape[0]:
                content.append(AudioRef(unit.audio.shape[0]))
                req = audio_pb2.EncodeChunkRequest(
                    session_id=sid, pcm=to_proto(torch.from_numpy(unit.audio)), request_id=request_id()
                )
                pieces.append(Piece(partial(audio_h.EncodeChunk.remote, req)))
            prompt = await self._user_prompt(sid, content)
            with metrics.stage_timer("unit"):
                await self._prefill(sid, prompt, pieces)
            self._local(sid).units += 1
        return len(units)

    async def _prefill_text(self, sid: str, text: str) -> None:
        await self._prefill(sid, await self._user_prompt(sid, [text]), [])

    async def _prefill(self, sid: str, prompt, pieces: list[Piece]) -> None:
        req = llm_pb2.PrefillRequest(session_id=sid, input=prefill_input(prompt), log=True, request_id=request_id())
        await self.pipeline.call_llm(sid, "Prefill", req, *pieces)

    # --- respond / interrupt ------------------------------------------------------------------------------------

    async def respond(self, caller: str, request: omni_pb2.RespondRequest):
        sid = request.session_id
        record = await self.store.get_owned(sid, caller)
        opts = request.options if request.HasField("options") else _stored_options(record)
        params = sampling_params(opts, STREAMING_DEFAULTS, self.pipeline.limits)
        stats = AnswerStats(started=time.perf_counter())
        local = self._local(sid)
        async with local.lock:
            await self._prefill_units(sid, local.muxer.flush())  # the partial last second (upstream: short chunk)
        await self.store.set_turn(sid, "answering")  # InvalidTurn if an answer is already running
        prefix = assistant_prefix(self.pipeline.tokenizer)
        speech = opts.speech if opts.speech.enabled else None
        gen = llm_pb2.GenerateRequest(
            session_id=sid,
            input=prefill_input(prefix),
            sampling=sampling_msg(params),
            spk_position=prefix.spk_bounds[-1][0] if speech is not None and prefix.spk_bounds else -1,
            log=True,
            request_id=request_id(),
        )
        stats.prompt_tokens = len(prefix)
        final_turn = "interrupted"
        try:
            async for event in self.pipeline.answer(gen, [], speech, stats, utterance=f"{sid}/{time.time_ns()}"):
                if event.HasField("final") and event.final.finish_reason == omni_pb2.FINISH_REASON_STOP:
                    final_turn = "answered"
                yield event
        finally:
            # Only a stop token completes a turn; length, interrupts and failures close it as interrupted.
            await self.store.set_turn(sid, final_turn)

    async def interrupt(self, caller: str, sid: str) -> omni_pb2.InterruptResponse:
        record = await self.store.get_owned(sid, caller)
        if record.turn != "answering":
            return omni_pb2.InterruptResponse(was_responding=False)
        reply = await self.pipeline.call_llm(sid, "Interrupt", llm_pb2.SessionRef(session_id=sid))
        return omni_pb2.InterruptResponse(was_responding=reply.was_generating)

    # --- close / info ---------------------------------------------------------------------------------------------

    async def close(self, caller: str, sid: str) -> None:
        await self.store.get_owned(sid, caller)
        await self._forget(sid)
        metrics.ACTIVE_SESSIONS.set(len(self.local))

    async def _forget(self, sid: str) -> None:
        """Free the session everywhere: Redis keys first (so no replica rebuilds it), then replica state."""
        await self.store.delete(sid)
        self.local.pop(sid, None)
        ref = llm_pb2.SessionRef(session_id=sid)
        await asyncio.gather(
            self.pipeline.call_llm(sid, "Drop", ref),
            self.stages.audio.options(session_id=sid).DropStream.remote(audio_pb2.DropStreamRequest(session_id=sid)),
            return_exceptions=True,  # a stage that is down frees the state anyway: its sweep finds the record gone
        )

    async def info(self, caller: str, sid: str) -> omni_pb2.SessionInfo:
        record = await self.store.get_owned(sid, caller)
        local = self.local.get(sid)
        return omni_pb2.SessionInfo(
            session_id=sid,
            mode=_MODE_NAMES.get(record.mode, omni_pb2.VOICE_MODE_UNSPECIFIED),
            language=record.language,
            state=_STATES.get(record.turn, omni_pb2.SESSION_STATE_UNSPECIFIED),
            token_count=record.tokens,
            units=local.units if local else 0,
            created_at=record.created_at,
            last_active_at=record.updated_at,
            idle_ttl_s=record.ttl_s,
            pending_audio_ms=local.muxer.pending_samples * 1000 // 16000 if local else 0,
        )


def _stored_options(record: SessionRecord) -> omni_pb2.GenerationOptions:
    raw = record.options.get("generation")
    return omni_pb2.GenerationOptions.FromString(base64.b64decode(raw)) if raw else omni_pb2.GenerationOptions()
