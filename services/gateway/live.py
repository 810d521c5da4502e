"""The live-session driver (upstream `streaming_prefill` / `streaming_generate`), free of any transport: it
works on the stage calls of `RayStages` (or any object with the same methods) and the session records in Redis,
and is what the gRPC servicer, the benchmarks and the recovery tests drive.

CreateSession prefills the system prompt (with its reference voice). AppendUnit runs the client's audio and
frames through the TDM muxer; each completed 1 s unit (`<unit>` + its latest frame + its second of audio) is
encoded at once and prefilled in order. Units are pipelined: a unit's encoders start as soon as its second is
complete, while the previous unit is still prefilling; only the LLM prefills (and the audio chunks, which
continue one Whisper stream) are chained, one after another, so order holds. A unit's first frame is encoded
the moment it arrives (`_Frame`), so a client that sends its frame early in the second, as a camera at one
frame a second does, finds it encoded when the second completes. Respond flushes the partial
second, waits for the session's prefills, then streams the answer; Interrupt stops it.

Redis per AppendUnit: one round trip (the live input, the user turn when this call starts one, and the TTL,
in one script); the stages fence their own state. The owner check is cached per session on this replica: the
API key of a session never changes, and a session closed elsewhere fails its next stage call (NOT_FOUND).

State here: per session, its muxer and the chain of its scheduled calls. The muxer's content (the unfinished
second of audio, the waiting frame, the unit count) is also written to Redis on every call, so another gateway
replica continues a session whose replica died without losing that second (`SessionRecords.load`). That write is
versioned, which keeps this copy honest when a session comes back: a scale-up moves some sessions to the new
replica and a scale-down moves them back, to a replica that still holds their muxer of before. Its next write
finds a newer version in Redis (`StaleLiveInput`); the call then drops the old copy, loads the session again and
starts over (`_locked`), still in that one round trip when nothing moved.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from protos.minicpmo.v1 import audio_pb2, llm_pb2, omni_pb2, vision_pb2
from services.common.audio import SAMPLE_RATE
from services.common.generation import STREAMING_DEFAULTS
from services.common.tensor_codec import to_proto
from services.gateway.answer import Answer
from services.gateway.auth import check_owner
from services.gateway.context import GatewayContext, prefill_input, sampling_msg
from services.gateway.prompts import (
    UNIT,
    AudioRef,
    ImageRef,
    Message,
    PlaceholderSettings,
    PlainText,
    Prompt,
    StreamingPromptState,
    assistant_prefix,
    build_streaming_prefill,
    system_prompt,
    with_instructions,
)
from services.gateway.requests import (
    VOICE_MODES,
    InvalidRequest,
    LimitExceeded,
    check_text,
    decode_pcm,
    image_ref,
    language,
    sampling_params,
    voice_mode,
)
from services.gateway.sessions import InvalidTurn, LiveInput, SessionRecord, SessionRecords, StaleLiveInput
from services.gateway.tdm import TDMMuxer, Unit
from services.runtime import metrics
from services.runtime.errors import ReplicaFull, original

_MODE_IDS = {v: k for k, v in VOICE_MODES.items()}
_STATES = {
    "idle": omni_pb2.SESSION_STATE_IDLE,
    "user_turn": omni_pb2.SESSION_STATE_LISTENING,
    "answering": omni_pb2.SESSION_STATE_RESPONDING,
    "answered": omni_pb2.SESSION_STATE_IDLE,
    "interrupted": omni_pb2.SESSION_STATE_IDLE,
}
T = TypeVar("T")
HEARTBEAT_S = 1.0  # the running answer extends its turn lease this often (the lease is a few periods)


def prompt_state(previous_turn: str) -> StreamingPromptState:
    """The upstream prompt flags of a session whose turn state was `previous_turn` before this input (a dead
    answer that was taken over, "answering", ends like an interrupted one)."""
    return StreamingPromptState(
        started=True,
        new_user_msg=previous_turn != "user_turn",
        generated=previous_turn in ("answered", "interrupted", "answering"),
        completed=previous_turn == "answered",
    )


def request_id() -> str:
    """Id of one logged stage request, the same on each retry (the stages answer a repeat without reapplying)."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class _Frame:
    """A frame waiting in the muxer for its unit, with its vision encode when one was started on arrival.

    The first frame of a unit is encoded at once: the vision encoder is stateless and the frame's embedding
    does not depend on where the unit lands, so the encode need not wait for the unit's second to complete.
    A later frame in the same second replaces it in the unit (the muxer keeps the latest) and is encoded when
    the unit completes, as before; so a client costs at most one wasted encode per second, whatever its frame
    rate. (The stateful audio chunks cannot start early: a chunk enters its session's Whisper stream.)"""

    data: bytes
    ref: ImageRef
    encode: Any | None = None  # the stage call's piece (`RayStages.encode_images`), None: encode with the unit


@dataclass
class _Session:
    """What this gateway replica keeps of a live session."""

    owner: str
    record: SessionRecord
    muxer: TDMMuxer
    units: int
    kv_len: int
    version: int  # of the live input in Redis that this copy matches
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # orders the session's inputs as they arrive
    prefill_tail: asyncio.Future | None = None  # the last scheduled prefill: the next one waits for it
    chunk_tail: asyncio.Future | None = None  # the last scheduled audio chunk: its stream continues in order

    def live_input(self) -> LiveInput:
        frame = self.muxer.pending_frame
        return LiveInput(self.muxer.pending_audio(), frame.data if frame else None, self.units, self.version)


class LiveSessions:
    def __init__(self, ctx: GatewayContext, records: SessionRecords):
        self.ctx = ctx
        self.records = records
        self.settings = PlaceholderSettings.streaming(ctx.image_cfg)
        self.sessions: dict[str, _Session] = {}
        self._sweeper: asyncio.Task | None = None

    @property
    def limits(self):
        return self.ctx.limits

    # --- this replica's view of a session -----------------------------------------------------------------------

    async def _session(self, sid: str, caller: str) -> _Session:
        """The session's local state, loaded from Redis the first time this replica serves it."""
        s = self.sessions.get(sid)
        if s is None:
            if self._sweeper is None:
                self._sweeper = asyncio.create_task(self._sweep())
            record, live = await self.records.load(sid)
            check_owner(caller, record.owner)
            muxer = TDMMuxer(first_seq=live.units)
            if live.pending_pcm.size:
                muxer.push_audio(live.pending_pcm)
            if live.pending_frame:
                muxer.push_frame(_Frame(live.pending_frame, image_ref(live.pending_frame, 0, self.ctx.image_cfg)))
            s = self.sessions.setdefault(
                sid, _Session(record.owner, record, muxer, live.units, record.tokens, live.version)
            )
            metrics.ACTIVE_SESSIONS.set(len(self.sessions))
        check_owner(caller, s.owner)
        return s

    async def _locked(self, sid: str, caller: str, work: Callable[[_Session], Awaitable[T]]) -> tuple[_Session, T]:
        """`work` on the session under its lock; when `work` finds this copy stale (see the module doc), once more
        on the session loaded again. Calls already scheduled on the old copy stay first in line."""
        s = await self._session(sid, caller)
        try:
            async with s.lock:
                return s, await work(s)
        except StaleLiveInput:
            if self.sessions.get(sid) is s:
                del self.sessions[sid]
        fresh = await self._session(sid, caller)
        async with fresh.lock:
            fresh.prefill_tail = fresh.prefill_tail or s.prefill_tail
            fresh.chunk_tail = fresh.chunk_tail or s.chunk_tail
            return fresh, await work(fresh)

    async def _sweep(self, period_s: float = 15.0) -> None:
        """Forget the local state of sessions whose record expired (or was closed through another replica)."""
        while True:
            await asyncio.sleep(period_s)
            with contextlib.suppress(Exception):  # Redis blip: next period
                for sid in await self.records.missing(list(self.sessions)):
                    self.sessions.pop(sid, None)
            metrics.ACTIVE_SESSIONS.set(len(self.sessions))

    # --- create ---------------------------------------------------------------------------------------------------

    async def create(self, caller: str, request: omni_pb2.CreateSessionRequest) -> omni_pb2.SessionInfo:
        mode = voice_mode(request.mode or omni_pb2.VOICE_MODE_OMNI)
        lang = language(request.language)
        sampling_params(request.options, STREAMING_DEFAULTS, self.limits)  # refuse bad options now
        ref = None
        if request.reference_voice.pcm:
            ref = decode_pcm(request.reference_voice, self.limits.max_audio_seconds, "reference_voice")
        msg = system_prompt(mode, lang, AudioRef(ref.shape[0]) if ref is not None else None)
        if request.instructions:
            msg = with_instructions(msg, check_text(request.instructions, self.limits, "instructions"))
        # The system prompt starts the session (upstream: a new session id, rendered with the TTS template).
        prompt = build_streaming_prefill(msg, StreamingPromptState(), self.ctx.tokenizer, settings=self.settings)
        most = self.limits.context_keep_tokens // 2  # every window roll keeps the system prompt whole
        if len(prompt.input_ids) > most:
            raise LimitExceeded(f"the system prompt (mode prompt, reference voice, instructions) would take "
                                f"{len(prompt.input_ids)} tokens; a live session allows {most} (half of the context "
                                f"it keeps when its window rolls): shorten the instructions or the reference voice")
        options = {"generation": base64.b64encode(request.options.SerializeToString()).decode()}
        attempts = self.limits.session_placement_attempts
        for attempt in range(1, attempts + 1):
            record = await self.records.create(caller, mode, lang, options)
            sid = record.session_id
            try:
                if self.limits.max_live_sessions_per_key:
                    await self.records.claim(caller, sid, self.limits.max_live_sessions_per_key)
                await self._start(caller, record, prompt, ref)
            except BaseException as e:
                await self._forget(sid, caller)
                full = original(e)
                if not isinstance(full, ReplicaFull):
                    raise
                if attempt == attempts:
                    raise ReplicaFull(f"no replica had room for a new live session ({attempts} placements tried); "
                                      f"the last refusal: {full.message}") from e  # fmt: skip
                metrics.SESSION_PLACEMENTS_REFUSED.inc()
                continue
            return self._info(await self.records.get(sid), LiveInput())
        raise AssertionError("unreachable")

    async def _start(self, caller: str, record: SessionRecord, prompt: Prompt, ref: Any) -> None:
        """Take the new session on in the replicas its id routes to: its audio stream on the AudioEncoder, its system
        prompt (with its reference voice) prefilled on LLMCore. Both settle before a failure is raised, so that
        forgetting the session drops whatever either replica took on."""
        sid = record.session_id
        pieces = []  # the reference voice goes through a throwaway Whisper stream (upstream drops that cache)
        if ref is not None:
            chunk = audio_pb2.EncodeChunkRequest(session_id=sid, pcm=to_proto(torch.from_numpy(ref)), fresh=True)
            pieces.append(self.ctx.stages.encode_chunk(chunk))
        s = _Session(caller, record, TDMMuxer(), 0, 0, 0)
        self.sessions[sid] = s
        prefill = self._prefill(sid, prompt, pieces, llm_pb2.PREFILL_KIND_SYSTEM)
        opened, system = await asyncio.gather(self.ctx.stages.open_stream(sid), prefill, return_exceptions=True)
        failures = [r for r in (opened, system) if isinstance(r, BaseException)]
        if failures:  # a failure other than a full replica comes first: placing the session again would not help
            raise min(failures, key=lambda e: isinstance(original(e), ReplicaFull))
        s.kv_len = system.kv_len

    # --- append ---------------------------------------------------------------------------------------------------

    async def append(self, caller: str, request: omni_pb2.AppendUnitRequest) -> omni_pb2.AppendUnitResponse:
        lim = self.limits
        if len(request.frames) > lim.max_frames_per_append:
            raise LimitExceeded(f"{len(request.frames)} frames in one call; the limit is {lim.max_frames_per_append}")
        text = check_text(request.text, lim, "text")
        pcm = decode_pcm(request.audio, lim.max_audio_seconds) if request.audio.pcm else None
        frames = [(f.data, image_ref(f.data, i, self.ctx.image_cfg)) for i, f in enumerate(request.frames)]
        if pcm is None and not frames and not text:
            raise InvalidRequest("AppendUnit carries nothing: send audio, frames or text")

        async def enter(s: _Session) -> tuple[list[Unit], list[asyncio.Future]]:
            for data, ref in frames:
                s.muxer.push_frame(_Frame(data, ref, None if s.muxer.pending_frame else self._encode_frame(data)))
            units = s.muxer.push_audio(pcm) if pcm is not None else []
            return units, await self._schedule(request.session_id, s, units, text)

        # under the session's lock: one session's inputs enter its KV in arrival order
        s, (units, scheduled) = await self._locked(request.session_id, caller, enter)
        results = await asyncio.gather(*scheduled)
        if results:
            s.kv_len = results[-1].kv_len
        return omni_pb2.AppendUnitResponse(
            units_prefilled=len(units),
            pending_audio_ms=s.muxer.pending_samples * 1000 // SAMPLE_RATE,
            token_count=s.kv_len,
        )

    async def _schedule(self, sid: str, s: _Session, units: list[Unit], text: str) -> list[asyncio.Future]:
        """Under the session lock: record the live input (starting the user turn if these inputs begin one) and
        start the encoders and the chained prefills of `units` and `text`."""
        s.units += len(units)
        starts_input = bool(units or text)
        prev = await self._take_turn(lambda: self.records.save_input(sid, s.live_input(), start_turn=starts_input))
        s.version += 1
        if prev == "answering":  # took the turn over from an answer whose gateway died: stop it on the LLM
            await self.ctx.stages.interrupt(sid)
        state = prompt_state(prev) if prev is not None else None
        scheduled = []
        for unit in units:
            scheduled.append(self._schedule_unit(sid, s, unit, state))
        if text:
            msg = Message("user", [PlainText(text)])
            prompt = build_streaming_prefill(msg, state, self.ctx.tokenizer, settings=self.settings)
            scheduled.append(self._chain_prefill(sid, s, prompt, [], llm_pb2.PREFILL_KIND_TEXT))
        return scheduled

    def _schedule_unit(self, sid: str, s: _Session, unit: Unit, state: StreamingPromptState) -> asyncio.Future:
        content: list = [UNIT]
        pieces = []
        if unit.frame is not None:
            content.append(unit.frame.ref)
            pieces.append(unit.frame.encode or self._encode_frame(unit.frame.data))
        if unit.audio.shape[0]:
            content.append(AudioRef(unit.audio.shape[0]))
            chunk = audio_pb2.EncodeChunkRequest(
                session_id=sid, pcm=to_proto(torch.from_numpy(unit.audio)), request_id=request_id()
            )
            pieces.append(self._chain_chunk(s, chunk))
        prompt = build_streaming_prefill(Message("user", content), state, self.ctx.tokenizer, settings=self.settings)
        return self._chain_prefill(sid, s, prompt, pieces, llm_pb2.PREFILL_KIND_UNIT)

    def _encode_frame(self, data: bytes):
        return self.ctx.stages.encode_images(vision_pb2.EncodeImagesRequest(images=[data], max_slice_nums=1))

    def _chain_chunk(self, s: _Session, chunk: audio_pb2.EncodeChunkRequest):
        """An audio chunk's encode, started once the session's previous chunk was encoded (one Whisper stream:
        the chunks must reach the AudioEncoder in order, and concurrent handle calls may arrive in any order)."""
        before = _pending(s.chunk_tail)

        async def encode():
            if before is not None:
                with contextlib.suppress(Exception):  # its own prefill reports its failure
                    await before
            piece = self.ctx.stages.encode_chunk(chunk)
            await piece.response  # in the stream now: the next chunk may follow
            return piece

        task = asyncio.ensure_future(encode())
        s.chunk_tail = task
        return _Deferred(task)

    def _chain_prefill(self, sid: str, s: _Session, prompt: Prompt, pieces: list, kind: int) -> asyncio.Future:
        """The prefill of `prompt`, sent once the session's previous prefill is in (its encoders run meanwhile)."""
        before = _pending(s.prefill_tail)
        started = time.perf_counter()

        async def prefill() -> llm_pb2.PrefillResponse:
            if before is not None:
                await before  # a failing earlier prefill fails the ones queued behind it: order would break
            resolved = [await p.piece() if isinstance(p, _Deferred) else p for p in pieces]
            reply = await self._prefill(sid, prompt, resolved, kind)
            metrics.STAGE_LATENCY.observe(time.perf_counter() - started, tags={"stage": "unit"})
            return reply

        task = asyncio.ensure_future(prefill())
        s.prefill_tail = task
        return task

    async def _prefill(self, sid: str, prompt: Prompt, pieces: list, kind: int) -> llm_pb2.PrefillResponse:
        req = llm_pb2.PrefillRequest(
            session_id=sid, input=prefill_input(prompt), request_id=request_id(), kind=kind,
            close_tokens=prompt.close_tokens, open_tokens=prompt.open_tokens,
        )  # fmt: skip
        return await self.ctx.stages.prefill(req, pieces)

    # --- respond / interrupt ------------------------------------------------------------------------------------

    async def respond(self, caller: str, request: omni_pb2.RespondRequest) -> AsyncIterator[omni_pb2.ChatEvent]:
        sid = request.session_id
        s = await self._session(sid, caller)
        opts = request.options if request.HasField("options") else _stored_options(s.record)
        params = sampling_params(opts, STREAMING_DEFAULTS, self.limits)

        async def flush(s: _Session) -> tuple[list[asyncio.Future], asyncio.Future | None]:  # the partial last second
            return await self._schedule(sid, s, s.muxer.flush(), ""), _pending(s.prefill_tail)

        s, (scheduled, tail) = await self._locked(sid, caller, flush)
        await asyncio.gather(*scheduled)
        if tail is not None:
            await tail
        answer_id = request_id()
        if await self._take_turn(lambda: self.records.begin_answer(sid, answer_id)) == "answering":  # a dead answer
            await self.ctx.stages.interrupt(sid)
        prefix = assistant_prefix(self.ctx.tokenizer)
        speech = opts.speech if opts.speech.enabled else None
        gen = llm_pb2.GenerateRequest(
            session_id=sid,
            input=prefill_input(prefix),
            sampling=sampling_msg(params),
            spk_position=prefix.spk_bounds[-1][0] if speech is not None and prefix.spk_bounds else -1,
            request_id=answer_id,
            stop_ids=self.ctx.special.stop_ids,
        )
        final_turn = "interrupted"
        heartbeat = asyncio.create_task(self._heartbeat(sid, answer_id))
        try:
            answer = Answer(self.ctx.stages, self.ctx.detokenizer, gen, [], speech, utterance_id=f"{sid}/{answer_id}")
            async for event in answer.events():
                if event.HasField("final"):
                    s.kv_len = event.final.usage.session_tokens or s.kv_len
                    if event.final.finish_reason == omni_pb2.FINISH_REASON_STOP:
                        final_turn = "answered"
                yield event
        finally:
            heartbeat.cancel()
            # Only a stop token completes a turn; length, interrupts and failures close it as interrupted. If
            # Redis is unreachable now, the turn's lease runs out on its own.
            with contextlib.suppress(Exception):
                await self.records.end_answer(sid, answer_id, final_turn)

    async def _take_turn(self, transition: Callable[[], Awaitable[T]]) -> T:
        """A turn transition that an answer in progress refuses. That answer is either running or dead with its
        gateway. A running one renews its lease every HEARTBEAT_S: once a refusal shows a lease renewed since the
        first one, the call is refused (within about one heartbeat). A dead one never renews: its lease runs out and
        the turn is taken over. So poll, bounded by one lease period."""
        deadline = time.monotonic() + self.records.answer_lease_s + 1.0
        first_lease: float | None = None
        while True:
            try:
                return await transition()
            except InvalidTurn as e:
                if first_lease is None:
                    first_lease = e.lease_deadline
                elif e.lease_deadline is not None and e.lease_deadline > first_lease:
                    raise  # the answer renewed its lease since the first refusal: it is running
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.25)  # polling the lease of a possibly dead answer (bounded above)

    async def _heartbeat(self, sid: str, answer_id: str) -> None:
        while await self.records.heartbeat(sid, answer_id):
            await asyncio.sleep(HEARTBEAT_S)

    async def interrupt(self, caller: str, sid: str) -> omni_pb2.InterruptResponse:
        await self._session(sid, caller)
        was_answering = await self.records.interrupt(sid)
        if was_answering:
            await self.ctx.stages.interrupt(sid)
        return omni_pb2.InterruptResponse(was_responding=was_answering)

    # --- close / info ---------------------------------------------------------------------------------------------

    async def close(self, caller: str, sid: str) -> None:
        s = await self._session(sid, caller)
        await self._forget(sid, s.owner)

    async def _forget(self, sid: str, owner: str) -> None:
        """Free the session everywhere: Redis keys first (so no stage rebuilds it), then the stages' state."""
        await self.records.delete(sid, owner)
        self.sessions.pop(sid, None)
        metrics.ACTIVE_SESSIONS.set(len(self.sessions))
        self.ctx.stages.forget(sid)

    async def info(self, caller: str, sid: str) -> omni_pb2.SessionInfo:
        """From Redis, not this replica's copy (which is stale if another replica served the session since)."""
        record, live = await self.records.load(sid)
        check_owner(caller, record.owner)
        return self._info(record, live)

    def _info(self, record: SessionRecord, live: LiveInput) -> omni_pb2.SessionInfo:
        return omni_pb2.SessionInfo(
            session_id=record.session_id,
            mode=_MODE_IDS.get(record.mode, omni_pb2.VOICE_MODE_UNSPECIFIED),
            language=record.language,
            state=_STATES.get(record.turn, omni_pb2.SESSION_STATE_UNSPECIFIED),
            token_count=record.tokens,
            units=live.units,
            created_at=record.created_at,
            last_active_at=record.updated_at,
            idle_ttl_s=record.ttl_s,
            pending_audio_ms=live.pending_pcm.size * 1000 // SAMPLE_RATE,
            context_window_tokens=self.limits.context_window_tokens,
            context_keep_tokens=self.limits.context_keep_tokens,
        )


def _pending(task: asyncio.Future | None) -> asyncio.Future | None:
    """`task` if it has not finished yet (a finished one already reported its result to its own caller)."""
    return task if task is not None and not task.done() else None


class _Deferred:
    """An audio chunk's Piece that exists once its turn in the session's stream came (see `_chain_chunk`)."""

    def __init__(self, task: asyncio.Future):
        self.task = task

    async def piece(self):
        return await self.task


def _stored_options(record: SessionRecord) -> omni_pb2.GenerationOptions:
    raw = record.options.get("generation")
    return omni_pb2.GenerationOptions.FromString(base64.b64decode(raw)) if raw else omni_pb2.GenerationOptions()
