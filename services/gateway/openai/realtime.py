"""`GET /v1/realtime`: OpenAI's Realtime protocol over a WebSocket, as one live session (`LiveSessions`).

A connection is one conversation. Its live session is created at the first input (or response), with the voice
that `session.update` chose by then. Input audio (base64 pcm16, 24 kHz as OpenAI's default or 16 kHz) is
resampled to 16 kHz as a stream and fed to the session's 1 s units as it arrives (`InputSender`); input images
(`conversation.item.create` with `input_image` parts, data URLs) are the video frames, text parts are typed text.

Turns. With `turn_detection: {type: "server_vad", ...}` (the default) the server finds the user's turns itself
(`vad.TurnDetector`, silero-vad): speech start -> `input_audio_buffer.speech_started`; silence of
`silence_duration_ms` -> `speech_stopped`, `committed`, and an answer. Speech while the model answers cancels
the answer (barge-in: `LiveSessions.interrupt`; `response.done` with status "cancelled", reason
"turn_detected"), and what the user said from `prefix_padding_ms` before their speech goes into the next turn
(the other audio heard during an answer is dropped, but for its last `prefix_padding_ms`). With
`turn_detection: null` the client commits (`input_audio_buffer.commit`) and asks (`response.create`); audio sent
during an answer then waits for it to end.

An answer streams as `response.created`, `response.output_item.added`, `response.content_part.added`, then
`response.output_audio.delta` (base64 pcm16 24 kHz) with `response.output_audio_transcript.delta` (or
`response.output_text.delta` for `output_modalities: ["text"]`), their `.done` events, and `response.done` with
the status (completed / incomplete at max_output_tokens / cancelled / failed) and usage.

Errors: a frame that is not a valid event, or an event this model cannot do, gets an `error` event (OpenAI's
error object, the client's `event_id` in it) and the conversation goes on. Closing the WebSocket closes the live
session (its KV cache and records are freed at once).

Authentication: `Authorization: Bearer <key>` (or `x-api-key`), or, from a browser (which cannot set headers on
a WebSocket), the subprotocol `openai-insecure-api-key.<key>` beside `realtime`, as OpenAI's browser clients do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soxr
from fastapi import WebSocket, WebSocketDisconnect

from protos.minicpmo.v1 import omni_pb2
from services.common.audio import SAMPLE_RATE
from services.gateway.auth import extract_api_key
from services.gateway.openai.chat_completions import check_model
from services.gateway.openai.errors import openai_error
from services.gateway.openai.media import (
    InvalidParam,
    b64encode,
    data_url_bytes,
    pcm16_from_float,
    pcm16_samples,
)
from services.gateway.openai.realtime_events import (
    AudioAppend,
    AudioClear,
    AudioCommit,
    InputAudio,
    InputImage,
    ItemCreate,
    ResponseCancel,
    ResponseCreate,
    SessionConfig,
    SessionUpdate,
    parse_event,
)
from services.gateway.openai.realtime_input import InputSender
from services.gateway.openai.vad import SpeechStarted, TurnDetector
from services.gateway.requests import check_text, image_ref
from services.runtime import metrics
from services.runtime.errors import FailedPrecondition

KEY_SUBPROTOCOL = "openai-insecure-api-key."
WHERE = "realtime"
log = logging.getLogger("ray.serve")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class Busy(FailedPrecondition):
    """An event that needs the model idle while it answers."""


@dataclass
class _Answer:
    id: str
    options: omni_pb2.GenerationOptions
    item_id: str = field(default_factory=lambda: new_id("item"))
    task: asyncio.Task | None = None
    streaming: bool = False  # the live session's answer has begun (an interrupt reaches it now)
    cancel_reason: str | None = None  # "turn_detected" | "client_cancelled"
    interrupt_sent: bool = False

    @property
    def active(self) -> bool:
        return self.task is not None and not self.task.done()


def subprotocols(ws: WebSocket) -> list[str]:
    return [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]


def presented_key(ws: WebSocket) -> str | None:
    key = extract_api_key(ws.headers.items())
    for p in subprotocols(ws):
        if key is None and p.startswith(KEY_SUBPROTOCOL):
            key = p[len(KEY_SUBPROTOCOL) :]
    return key


async def serve_realtime(ws: WebSocket, gateway: Any) -> None:
    """One realtime connection, from handshake to close."""
    metrics.REQUESTS.inc(tags={"rpc": WHERE})
    await ws.accept(subprotocol="realtime" if "realtime" in subprotocols(ws) else None)
    conn = RealtimeConnection(ws, gateway)
    writer = asyncio.create_task(conn.write())
    try:
        try:
            conn.caller = gateway.auth.authenticate(presented_key(ws))
            if "model" in ws.query_params:
                check_model(ws.query_params["model"])
        except Exception as e:
            conn.error(e)
            conn.outbox.put_nowait(None)
            await writer
            await ws.close(code=1008)
            return
        conn.emit("session.created", session=conn.config.to_json(conn.id))
        while True:
            frame = await ws.receive()
            if frame["type"] == "websocket.disconnect":
                break
            if frame.get("text") is None:
                conn.error(InvalidParam("binary frames are not events: send each event as a JSON text frame"))
                continue
            await conn.handle(frame["text"])
    except WebSocketDisconnect:
        pass
    finally:
        await conn.close()
        writer.cancel()


class RealtimeConnection:
    def __init__(self, ws: WebSocket, gateway: Any):
        self.ws = ws
        self.live = gateway.live
        self.ctx = gateway.ctx
        self.caller = ""
        self.id = new_id("sess")
        self.config = SessionConfig()
        self.outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        limits = self.ctx.limits
        self.input = InputSender(self._append, self.error, max_held_s=limits.max_audio_seconds / 2)
        self.resampler: soxr.ResampleStream | None = None
        self.resampler_rate = 0
        self.detector: TurnDetector | None = None
        self.speech_item: str | None = None  # the user audio item that speech started
        self.speech_from: int | None = None  # where the speech heard during an answer starts (padding included)
        self.audio_since_commit = 0
        self.last_item: str | None = None
        self.answer: _Answer | None = None
        self.session: asyncio.Future | None = None  # the live session's id, once created
        self.tasks: set[asyncio.Task] = set()
        self._vad_from_config()

    # --- output -------------------------------------------------------------------------------------------------

    def emit(self, kind: str, **fields: Any) -> None:
        self.outbox.put_nowait({"type": kind, "event_id": new_id("event"), **fields})

    def error(self, exc: BaseException, event_id: str | None = None) -> dict[str, Any]:
        _, err = openai_error(exc, WHERE)
        self.emit("error", error={**err, "event_id": event_id})
        return err

    async def write(self) -> None:
        try:
            while (event := await self.outbox.get()) is not None:
                await self.ws.send_text(json.dumps(event))
        except Exception as e:  # the client is gone; the receive loop ends the connection
            log.debug("realtime: stopped sending (%s)", type(e).__name__)

    # --- input events -------------------------------------------------------------------------------------------

    async def handle(self, text: str) -> None:
        event_id = None
        try:
            event, event_id = parse_event(text)
            if isinstance(event, SessionUpdate):
                self._update(event)
            elif isinstance(event, AudioAppend):
                await self._audio(event)
            elif isinstance(event, AudioCommit):
                self._client_commit()
            elif isinstance(event, AudioClear):
                self.audio_since_commit = 0
                self.input.clear()
                self.emit("input_audio_buffer.cleared")
            elif isinstance(event, ItemCreate):
                self._item(event)
            elif isinstance(event, ResponseCreate):
                if self.answer is not None and self.answer.active:
                    raise Busy("the model is answering already: wait for response.done or send response.cancel")
                self._start_answer(self.config.options(event.response))
            elif isinstance(event, ResponseCancel):
                if self.answer is None or not self.answer.active:
                    raise Busy("no response is in progress")
                self._cancel("client_cancelled")
        except Exception as e:  # the event is refused; the conversation goes on
            self.error(e, event_id)

    def _update(self, event: SessionUpdate) -> None:
        before = self.config.vad_settings()
        self.config = self.config.updated(event.session, started=self.session is not None, limits=self.ctx.limits)
        if self.config.vad_settings() != before:
            self._vad_from_config()
        self.emit("session.updated", session=self.config.to_json(self.id))

    def _vad_from_config(self) -> None:
        settings = self.config.vad_settings()
        self.detector = TurnDetector(settings) if settings is not None else None

    async def _audio(self, event: AudioAppend) -> None:
        pcm = self._resample(pcm16_samples(event.audio, "audio"))
        if self.detector is not None:
            origin = self.input.end - self.detector.samples  # where the detector's stream starts in the input's
            # the model releases the GIL: in a thread, many connections' VAD run side by side off the event loop
            for turn_event in await asyncio.to_thread(self.detector.push, pcm):
                self._turn_event(turn_event, origin)
        self.audio_since_commit += pcm.shape[0]
        self.input.add_audio(pcm)

    def _resample(self, pcm: np.ndarray) -> np.ndarray:
        rate = self.config.input_rate
        if rate == SAMPLE_RATE:
            return pcm
        if self.resampler is None or self.resampler_rate != rate:
            self.resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32")  # one stream: no seams
            self.resampler_rate = rate
        return self.resampler.resample_chunk(pcm)

    def _item(self, event: ItemCreate) -> None:
        if event.previous_item_id not in (None, self.last_item):
            raise InvalidParam("items can only be added at the end of the conversation", "previous_item_id")
        limits, frames, texts, audio = self.ctx.limits, [], [], []
        for j, part in enumerate(event.item.content):  # all parts checked before any goes in
            param = f"item.content[{j}]"
            if isinstance(part, InputImage):
                data = data_url_bytes(part.image_url, f"{param}.image_url")
                image_ref(data, 0, self.ctx.image_cfg)  # header and size checked now
                frames.append(data)
            elif isinstance(part, InputAudio):
                pcm = pcm16_samples(part.audio, f"{param}.audio")
                audio.append(soxr.resample(pcm, self.config.input_rate, SAMPLE_RATE) if pcm.size else pcm)
            else:
                texts.append(check_text(part.text, limits, f"{param}.text"))
        if (texts or audio) and self.answer is not None and self.answer.active:
            raise Busy("the model is answering: send text or audio items after response.done (or response.cancel)")
        for data in frames:
            self.input.add_frame(data)  # the latest one goes with the next unit
        for pcm in audio:
            self.input.add_audio(pcm)
        if audio:
            self.input.seal()
        for text in texts:
            self.input.add_text(text)
        item_id = event.item.id or new_id("item")
        self._item_added(item_id, [p.model_dump(exclude={"audio", "image_url"}) for p in event.item.content])

    def _item_added(self, item_id: str, content: list[dict[str, Any]]) -> None:
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                "content": content}  # fmt: skip
        self.emit("conversation.item.added", previous_item_id=self.last_item, item=item)
        self.emit("conversation.item.done", previous_item_id=self.last_item, item=item)
        self.last_item = item_id

    # --- turns ----------------------------------------------------------------------------------------------------

    def _turn_event(self, event, origin: int) -> None:
        """A turn event of the detector; `origin`: where its stream starts in the input's (samples)."""
        vad = self.config.turn_detection
        at_ms = origin * 1000 // SAMPLE_RATE
        if isinstance(event, SpeechStarted):
            self.speech_item = new_id("item")
            self.emit("input_audio_buffer.speech_started", audio_start_ms=at_ms + event.audio_start_ms,
                      item_id=self.speech_item)  # fmt: skip
            if self.input.held:
                self.speech_from = origin + event.audio_start_ms * SAMPLE_RATE // 1000
            if self.answer is not None and self.answer.active and vad.interrupt_response:
                self._cancel("turn_detected")  # barge-in
            return
        item = self.speech_item or new_id("item")
        self.speech_item = None
        self.emit("input_audio_buffer.speech_stopped", audio_end_ms=at_ms + event.audio_end_ms, item_id=item)
        previous = self.answer
        if previous is None or not previous.active:
            self._commit(item, respond=vad.create_response)
        else:  # the user spoke over the answer: their turn is theirs once that answer has ended
            self._spawn(self._commit_after(previous, item, vad.create_response))

    async def _commit_after(self, previous: _Answer, item: str, respond: bool) -> None:
        await asyncio.shield(previous.task)
        self._commit(item, respond=respond and not (self.answer is not None and self.answer.active))

    def _client_commit(self) -> None:
        if self.answer is not None and self.answer.active:
            raise Busy("the model is answering: commit after response.done (or response.cancel)")
        if not self.audio_since_commit:
            raise InvalidParam("the input audio buffer is empty: append audio before committing")
        self._commit(new_id("item"), respond=False)

    def _commit(self, item_id: str, respond: bool) -> None:
        self.input.seal()
        self.audio_since_commit = 0
        self.emit("input_audio_buffer.committed", previous_item_id=self.last_item, item_id=item_id)
        self._item_added(item_id, [{"type": "input_audio", "transcript": None}])
        if respond:
            self._start_answer(self.config.options())

    # --- answers --------------------------------------------------------------------------------------------------

    def _start_answer(self, options: omni_pb2.GenerationOptions) -> None:
        self.input.seal()
        self.input.hold()
        self.speech_from = None
        answer = _Answer(new_id("resp"), options)
        self.answer = answer
        answer.task = self._spawn(self._run_answer(answer))

    def _cancel(self, reason: str) -> None:
        answer = self.answer
        if answer.cancel_reason is None:
            answer.cancel_reason = reason
            if answer.streaming:
                self._spawn(self._interrupt(answer))

    async def _interrupt(self, answer: _Answer) -> None:
        if answer.interrupt_sent:
            return
        answer.interrupt_sent = True
        try:
            await self.live.interrupt(self.caller, await self._session())
        except Exception as e:
            self.error(e)

    async def _run_answer(self, answer: _Answer) -> None:
        speech = answer.options.speech.enabled
        modality = "audio" if speech else "text"
        self.emit("response.created", response=_response(answer, "in_progress", [], speech))
        text, final, failure = "", None, None
        part_of = {"response_id": answer.id, "item_id": answer.item_id, "output_index": 0, "content_index": 0}
        item = {"id": answer.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}  # fmt: skip
        try:
            await self.input.drained()
            sid = await self._session()
            if answer.cancel_reason is None:
                self.emit("response.output_item.added", response_id=answer.id, output_index=0, item=item)
                self.emit("response.content_part.added", **part_of, part=_part(modality, ""))
                request = omni_pb2.RespondRequest(session_id=sid, options=answer.options)
                async for event in self.live.respond(self.caller, request):
                    answer.streaming = True
                    kind = event.WhichOneof("event")
                    if kind == "final":
                        final = event.final
                    elif answer.cancel_reason is not None:
                        await self._interrupt(answer)  # no more deltas once cancelled
                    elif kind == "text_delta":
                        text += event.text_delta
                        delta = "response.output_audio_transcript.delta" if speech else "response.output_text.delta"
                        self.emit(delta, **part_of, delta=event.text_delta)
                    elif kind == "audio" and event.audio.pcm:
                        self.emit("response.output_audio.delta", **part_of,
                                  delta=b64encode(pcm16_from_float(event.audio.pcm)))  # fmt: skip
        except Exception as e:
            failure = self.error(e)
        finally:
            self.input.release(self._keep_from())
        status, details = _status(answer, final, failure)
        output = []
        if answer.streaming or final is not None:
            if speech:
                self.emit("response.output_audio.done", **part_of)
                self.emit("response.output_audio_transcript.done", **part_of, transcript=text)
            else:
                self.emit("response.output_text.done", **part_of, text=text)
            self.emit("response.content_part.done", **part_of, part=_part(modality, text))
            item = {**item, "status": "completed" if status == "completed" else "incomplete",
                    "content": [_part(modality, text, output=True)]}  # fmt: skip
            self.emit("response.output_item.done", response_id=answer.id, output_index=0, item=item)
            output = [item]
        done = _response(answer, status, output, speech, details)
        if final is not None:
            u = final.usage
            done["usage"] = {"total_tokens": u.prompt_tokens + u.completion_tokens, "input_tokens": u.prompt_tokens,
                             "output_tokens": u.completion_tokens}  # fmt: skip
        self.emit("response.done", response=done)

    def _keep_from(self) -> int | None:
        """What the turn detection keeps of the audio heard during an answer (see the module doc)."""
        vad = self.config.turn_detection
        if vad is None:
            return None
        if self.speech_from is not None or (self.detector is not None and self.detector.speaking):
            return self.speech_from
        return self.input.end - vad.prefix_padding_ms * SAMPLE_RATE // 1000

    # --- the live session -----------------------------------------------------------------------------------------

    async def _session(self) -> str:
        if self.session is None:
            self.session = asyncio.ensure_future(self._create())
        try:
            return await asyncio.shield(self.session)
        except Exception:
            self.session = None  # the next input tries again (e.g. after the client fixed its voice)
            raise

    async def _create(self) -> str:
        return (await self.live.create(self.caller, self.config.create_request())).session_id

    async def _append(self, request: omni_pb2.AppendUnitRequest) -> None:
        request.session_id = await self._session()
        await self.live.append(self.caller, request)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self) -> None:
        """The WebSocket is gone: stop the answer, free the live session."""
        answer = self.answer
        if answer is not None and answer.active and answer.streaming:
            with contextlib.suppress(Exception):
                await self.live.interrupt(self.caller, await self._session())
        self.input.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.session is not None and self.session.done() and not self.session.exception():
            with contextlib.suppress(Exception):
                await self.live.close(self.caller, self.session.result())


def _part(modality: str, text: str, output: bool = False) -> dict[str, Any]:
    kind = f"output_{modality}" if output else modality
    return {"type": kind, "transcript": text} if modality == "audio" else {"type": kind, "text": text}


def _response(answer: _Answer, status: str, output: list, speech: bool,
              details: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "id": answer.id, "object": "realtime.response", "status": status, "status_details": details,
        "output": output, "output_modalities": ["audio" if speech else "text"],
        "max_output_tokens": answer.options.max_new_tokens or "inf",
    }  # fmt: skip


def _status(answer: _Answer, final: omni_pb2.FinalEvent | None,
            failure: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:  # fmt: skip
    if failure is not None:
        return "failed", {"type": "failed", "error": failure}
    if answer.cancel_reason is not None or (final and final.finish_reason == omni_pb2.FINISH_REASON_INTERRUPTED):
        return "cancelled", {"type": "cancelled", "reason": answer.cancel_reason or "client_cancelled"}
    if final is not None and final.finish_reason == omni_pb2.FINISH_REASON_LENGTH:
        return "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
    return "completed", None
