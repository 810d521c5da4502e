"""How the gateway reaches the stages: `RayStages`, the stage calls of a request as methods (encode, prefill,
generate, speak, ...) over Ray Serve handles, with retries when the replica that served a call died, and
cleanup calls that never hold up an error path.

The chat flow and the live-session driver only use these methods, never a handle, so they run unchanged over
any other implementation of them (the in-process benchmark runs the same driver over in-process stages).

Every call is issued outside the Serve request context of the gateway's own request (`detached`): Ray Serve
tags a call made while serving a request with that request's ids, and two calls that carry the same ids and
overlap on one replica (an utterance's Speak stream and its PushText calls; the frames of several units) do not
both get through. Each stage call is its own request here; the gateway cancels what it started itself.

A call in flight on a replica that dies fails with ActorDiedError / ActorUnavailableError and Serve does not
retry it; the session-affinity router sends the retry to the session's new owner, which rebuilds the session
from its replay log first. Retries are safe because every logged request carries an id its stage recognises
(`services.runtime.session_stage`): one the old owner logged before dying is answered, not applied twice.

The live unit's calls (the encoders, LLMCore's prefill) go to the replica Serve chose over that replica's own
direct server (`services.runtime.direct`; one lost there is sent again through Serve, and fails here as above);
the other calls (streams, the TTS, cleanup) go through the handles.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

from ray.exceptions import ActorDiedError, ActorUnavailableError

from protos.minicpmo.v1 import audio_pb2, llm_pb2, tensor_pb2, tts_pb2, vision_pb2
from services.runtime.direct import DirectCalls
from services.runtime.replica import detached, in_background, with_own_transport

T = TypeVar("T")
log = logging.getLogger("ray.serve")
STAGE_DIED = (ActorDiedError, ActorUnavailableError)
RETRIES = 8  # attempts of one call, backing off to ~10 s in all: a replica restart
CLEANUP_TIMEOUT_S = 3.0


class Piece:
    """An encoder call whose embeddings an LLMCore call takes as an argument. It starts at once, as a task of its
    own (a fresh Serve request context: see `detached`); a retried LLMCore call asks the encoder again, since the
    first answer may be the very failure that failed the call (the encoder replica died before replying). Asking
    again is safe: offline encoding is stateless and a streaming chunk carries a request id its replica
    recognises."""

    def __init__(self, call: Callable[[], Awaitable[tensor_pb2.Embeddings]]):
        self.call = call
        self.response = self._start()

    def again(self) -> asyncio.Task:
        self.response = self._start()
        return self.response

    def _start(self) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(self.call(), context=contextvars.Context())
        task.add_done_callback(_retrieved)  # a failure the LLMCore call never awaited is not "never retrieved"
        return task


def _retrieved(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


async def _inputs(pieces: list[Piece], attempt: int) -> list[tensor_pb2.Embeddings]:
    """The encoders' embeddings for attempt `attempt` of an LLMCore call (asked again after a failure)."""
    return list(await asyncio.gather(*(p.response if attempt == 0 else p.again() for p in pieces)))


def _backoff(attempt: int) -> float:
    return min(0.05 * 2**attempt, 2.0)


async def retried(what: str, call: Callable[[int], Awaitable[T]]) -> T:
    """`call(attempt)` until it does not fail for a dead replica (at most RETRIES times)."""
    for attempt in range(RETRIES):
        try:
            return await call(attempt)
        except STAGE_DIED as e:
            if attempt == RETRIES - 1:
                raise
            log.warning("%s failed (%s); retrying on the replacement", what, e)
            await asyncio.sleep(_backoff(attempt))
    raise AssertionError("unreachable")


async def retried_stream(what: str, call: Callable[[int], AsyncIterator[T]]) -> AsyncIterator[T]:
    """A streamed call retried like `retried` as long as nothing was streamed yet."""
    for attempt in range(RETRIES):
        started = False
        try:
            async for item in call(attempt):
                started = True
                yield item
            return
        except STAGE_DIED as e:
            if started or attempt == RETRIES - 1:
                raise
            log.warning("%s failed (%s); retrying on the replacement", what, e)
            await asyncio.sleep(_backoff(attempt))


async def _bounded(what: str, call: Awaitable[Any]) -> None:
    try:
        await asyncio.wait_for(call, CLEANUP_TIMEOUT_S)
    except Exception as e:  # a dead or busy replica: its own sweep frees the state, or it died with it
        log.info("cleanup %s did not complete (%s); the stage's sweep releases it", what, type(e).__name__)


def cleanup(what: str, call: Awaitable[Any]) -> None:
    """Fire a best-effort release call in the background: bounded in time, never raises, never waited for."""
    in_background(_bounded(what, call))


class RayStages:
    """The stage calls over Ray Serve handles of the deployments (the TTS reaches its Vocoder itself)."""

    def __init__(self, vision: Any, audio: Any, llm: Any, tts: Any):
        self.vision, self.audio, self.llm, self.tts = (with_own_transport(h) for h in (vision, audio, llm, tts))
        self.direct = DirectCalls()

    # --- encoders (their embeddings go into an LLM call) ----------------------------------------------------------

    def encode_images(self, request: vision_pb2.EncodeImagesRequest) -> Piece:
        return Piece(partial(self.direct.call, self.vision, "Encode", request, tensor_pb2.Embeddings))

    def encode_audio(self, request: audio_pb2.EncodeAudioRequest) -> Piece:
        return Piece(partial(self.direct.call, self.audio, "Encode", request, tensor_pb2.Embeddings))

    def encode_chunk(self, request: audio_pb2.EncodeChunkRequest) -> Piece:
        audio = self.audio.options(session_id=request.session_id)
        return Piece(partial(self.direct.call, audio, "EncodeChunk", request, tensor_pb2.Embeddings))

    async def open_stream(self, session_id: str) -> None:
        audio = self.audio.options(session_id=session_id)
        request = audio_pb2.OpenStreamRequest(session_id=session_id)
        await retried(f"AudioEncoder OpenStream of {session_id}", lambda _: detached(audio.OpenStream.remote, request))

    # --- LLM ------------------------------------------------------------------------------------------------------

    async def prefill(self, request: llm_pb2.PrefillRequest, pieces: list[Piece]) -> llm_pb2.PrefillResponse:
        llm = self.llm.options(session_id=request.session_id)

        async def attempt_prefill(attempt: int) -> llm_pb2.PrefillResponse:
            inputs = await _inputs(pieces, attempt)
            return await self.direct.call(llm, "Prefill", request, llm_pb2.PrefillResponse, inputs)

        return await retried(f"LLMCore Prefill of {request.session_id}", attempt_prefill)

    def generate(self, request: llm_pb2.GenerateRequest, pieces: list[Piece]) -> AsyncIterator[llm_pb2.GenerateEvent]:
        llm = self.llm.options(session_id=request.session_id)

        async def attempt_generate(attempt: int) -> AsyncIterator[llm_pb2.GenerateEvent]:
            inputs = await _inputs(pieces, attempt)
            async for event in detached(llm.Generate.options(stream=True).remote, request, *inputs):
                yield event

        return retried_stream(f"LLMCore Generate of {request.session_id}", attempt_generate)

    async def interrupt(self, session_id: str) -> bool:
        llm = self.llm.options(session_id=session_id)
        ref = llm_pb2.SessionRef(session_id=session_id)
        reply = await retried(f"LLMCore Interrupt of {session_id}", lambda _: detached(llm.Interrupt.remote, ref))
        return reply.was_generating

    def forget(self, session_id: str) -> None:
        """Free a closed session's state in the stages (in the background; their sweeps free what this misses)."""
        llm, audio = self.llm.options(session_id=session_id), self.audio.options(session_id=session_id)
        cleanup(f"LLM state of {session_id}", detached(llm.Drop.remote, llm_pb2.SessionRef(session_id=session_id)))
        cleanup(f"audio state of {session_id}",
                detached(audio.DropStream.remote, audio_pb2.DropStreamRequest(session_id=session_id)))  # fmt: skip

    # --- speech ---------------------------------------------------------------------------------------------------

    def speak(self, request: tts_pb2.StartUtteranceRequest) -> AsyncIterator[tts_pb2.SpeechChunk]:
        return detached(self.tts.options(session_id=request.utterance_id).Speak.options(stream=True).remote, request)

    async def push_text(self, utterance_id: str, text: str) -> None:
        request = tts_pb2.PushTextRequest(utterance_id=utterance_id, text=text)
        await detached(self.tts.options(session_id=utterance_id).PushText.remote, request)

    async def finish_text(self, utterance_id: str) -> None:
        ref = tts_pb2.UtteranceRef(utterance_id=utterance_id)
        await detached(self.tts.options(session_id=utterance_id).Finish.remote, ref)

    def cancel_speech(self, utterance_id: str) -> None:
        ref = tts_pb2.UtteranceRef(utterance_id=utterance_id)
        cleanup(f"TTS utterance {utterance_id}", detached(self.tts.options(session_id=utterance_id).Cancel.remote, ref))
