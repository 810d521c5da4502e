"""The pipeline in one process: every stage's deployment class instantiated here and called directly, behind the
same stage calls as `RayStages`, so the live-session driver runs unchanged over it. What remains is exactly the
deployed pipeline minus its transport (Ray calls, the gRPC proxy): the benchmarks compare the two to measure
what the transport costs. Session state still lives in Redis (a real redis-server).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from protos.minicpmo.v1 import audio_pb2, llm_pb2, tts_pb2, vision_pb2
from services.audio_encoder.deployment import AudioEncoder
from services.llm_core.deployment import LLMCore
from services.tts_decoder.deployment import TTSDecoder
from services.vision_encoder.deployment import VisionEncoder


class LocalPiece:
    """An encoder call running in this process (the counterpart of `services.gateway.stages.Piece`)."""

    def __init__(self, call: Callable[[], Awaitable[Any]]):
        self.call = call
        self.response = asyncio.ensure_future(call())

    def again(self) -> asyncio.Future:
        self.response = asyncio.ensure_future(self.call())
        return self.response


class LocalStages:
    def __init__(self, model_dir: str, device: str, redis_url: str, **llm_kwargs: Any):
        self.vision = VisionEncoder.func_or_class(model_dir, device)
        self.audio = AudioEncoder.func_or_class(model_dir, device, redis_url)
        self.llm = LLMCore.func_or_class(model_dir, device, redis_url, **llm_kwargs)
        self.tts = TTSDecoder.func_or_class(model_dir, device)

    def close(self) -> None:
        self.llm.engine.stop()

    def encode_images(self, request: vision_pb2.EncodeImagesRequest) -> LocalPiece:
        return LocalPiece(lambda: self.vision.Encode(request))

    def encode_audio(self, request: audio_pb2.EncodeAudioRequest) -> LocalPiece:
        return LocalPiece(lambda: self.audio.Encode(request))

    def encode_chunk(self, request: audio_pb2.EncodeChunkRequest) -> LocalPiece:
        return LocalPiece(lambda: self.audio.EncodeChunk(request))

    async def open_stream(self, session_id: str) -> None:
        await self.audio.OpenStream(audio_pb2.OpenStreamRequest(session_id=session_id))

    async def prefill(self, request: llm_pb2.PrefillRequest, pieces: list[LocalPiece]) -> llm_pb2.PrefillResponse:
        return await self.llm.Prefill(request, *[await p.response for p in pieces])

    async def generate(self, request: llm_pb2.GenerateRequest, pieces: list[LocalPiece]) -> AsyncIterator[llm_pb2.GenerateEvent]:
        async for event in self.llm.Generate(request, *[await p.response for p in pieces]):
            yield event

    async def interrupt(self, session_id: str) -> bool:
        return (await self.llm.Interrupt(llm_pb2.SessionRef(session_id=session_id))).was_generating

    def forget(self, session_id: str) -> None:
        self.llm.forget(session_id)
        self.audio.forget(session_id)

    def speak(self, request: tts_pb2.StartUtteranceRequest) -> AsyncIterator[tts_pb2.SpeechChunk]:
        return self.tts.Speak(request)

    async def push_text(self, utterance_id: str, text: str) -> None:
        await self.tts.PushText(tts_pb2.PushTextRequest(utterance_id=utterance_id, text=text))

    async def finish_text(self, utterance_id: str) -> None:
        await self.tts.Finish(tts_pb2.UtteranceRef(utterance_id=utterance_id))

    def cancel_speech(self, utterance_id: str) -> None:
        asyncio.ensure_future(self.tts.Cancel(tts_pb2.UtteranceRef(utterance_id=utterance_id)))
