"""OpenAI Chat Completions <-> the public API: a `/v1/chat/completions` body becomes a `ChatRequest` (the same
request the gRPC `Chat` takes), and the `ChatEvent` stream it answers becomes a `chat.completion` object or
`chat.completion.chunk` objects.

What maps (everything else is refused with the parameter named, never ignored):
  messages       system / developer -> ROLE_SYSTEM, user, assistant (text); parts: `text`, `image_url` (data URLs
                 only), `input_audio` ({data: base64, format: "wav" | "pcm16"}: pcm16 = 24 kHz mono int16 LE).
                 An `input_audio` part in a system message is the reference voice (needs `audio.voice`).
  modalities     ["text"] (default) or ["text", "audio"]: speech on, `audio: {voice, format}` required;
                 voice = an upstream voice mode (default, omni, audio_assistant, audio_roleplay, voice_cloning),
                 format = "wav" | "pcm16" (24 kHz; a stream always sends pcm16 deltas, so it needs "pcm16").
  sampling       temperature (0 = greedy, text and speech), top_p, seed (text and speech), max_tokens /
                 max_completion_tokens -> max_new_tokens; extensions as vLLM takes them: top_k,
                 repetition_penalty. frequency/presence_penalty only as 0; n only as 1.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from protos.minicpmo.v1 import omni_pb2
from services.gateway.openai.errors import validation_error
from services.gateway.openai.media import (
    InvalidParam,
    b64encode,
    data_url_bytes,
    input_audio,
    pcm16_from_float,
    wav_file,
)
from services.gateway.requests import VOICE_MODES
from services.runtime.errors import NotFound

MODEL_ID = "MiniCPM-o-2_6"
VOICES = {name: mode for mode, name in VOICE_MODES.items()}
FINISH_REASONS = {omni_pb2.FINISH_REASON_STOP: "stop", omni_pb2.FINISH_REASON_LENGTH: "length"}
ROLES = {
    "system": omni_pb2.ROLE_SYSTEM,
    "developer": omni_pb2.ROLE_SYSTEM,
    "user": omni_pb2.ROLE_USER,
    "assistant": omni_pb2.ROLE_ASSISTANT,
}


class UnknownModel(NotFound):
    """A model id this server does not serve."""


def check_model(model: str) -> None:
    if model != MODEL_ID:
        raise UnknownModel(f"the model {model!r} does not exist here; this server serves {MODEL_ID!r}")


# --- the request body -------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageUrl(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"  # images are always sliced as the checkpoint configures


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


class InputAudio(_Strict):
    data: str
    format: Literal["wav", "pcm16"]


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


Part = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: list[Part]

    @field_validator("content", mode="before")
    @classmethod
    def _text_shorthand(cls, value: Any) -> Any:
        return [{"type": "text", "text": value}] if isinstance(value, str) else value


class AudioOutput(_Strict):
    voice: str
    format: Literal["wav", "pcm16"]


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] = Field(default_factory=lambda: ["text"])
    audio: AudioOutput | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    n: Literal[1] = 1
    frequency_penalty: Literal[0] | None = None
    presence_penalty: Literal[0] | None = None
    user: str | None = None  # the caller's end-user id, for its own bookkeeping
    top_k: int | None = Field(None, ge=1)  # extension (vLLM's)
    repetition_penalty: float | None = Field(None, gt=0.0)  # extension (vLLM's)


def parse_body(body: Any) -> ChatCompletionRequest:
    """The JSON body, validated; the first problem becomes a 400 naming its parameter."""
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


@dataclass(frozen=True)
class ReplyFormat:
    """How the answer goes back: streamed or not, with speech in which container."""

    stream: bool
    include_usage: bool
    audio_format: str | None  # "wav" | "pcm16", None for text only


def to_chat_request(req: ChatCompletionRequest) -> tuple[omni_pb2.ChatRequest, ReplyFormat]:
    check_model(req.model)
    speech = "audio" in req.modalities
    if "text" not in req.modalities:
        raise InvalidParam('modalities must include "text" (["text"] or ["text", "audio"])', "modalities")
    if speech and req.audio is None:
        raise InvalidParam('modalities ["text", "audio"] need `audio`: {"voice": ..., "format": ...}', "audio")
    if req.audio is not None and not speech:
        raise InvalidParam('`audio` is only used with modalities ["text", "audio"]', "audio")
    if speech and req.stream and req.audio.format != "pcm16":
        raise InvalidParam('a streamed answer sends pcm16 audio deltas: use audio.format "pcm16"', "audio.format")
    if req.max_tokens and req.max_completion_tokens and req.max_tokens != req.max_completion_tokens:
        raise InvalidParam("max_tokens and max_completion_tokens differ: send one of them", "max_tokens")

    chat = omni_pb2.ChatRequest()
    if req.audio is not None:
        if req.audio.voice not in VOICES:
            raise InvalidParam(f"audio.voice {req.audio.voice!r} is not a voice here; use one of {list(VOICES)}",
                               "audio.voice")  # fmt: skip
        chat.voice_mode = VOICES[req.audio.voice]
    for i, m in enumerate(req.messages):
        msg = _message(m, f"messages[{i}]", chat)
        if msg.content:
            chat.messages.append(msg)
    if chat.reference_voice.pcm and req.audio is None:
        raise InvalidParam("a reference voice (input_audio in a system message) needs audio.voice", "audio")

    opts = chat.options
    opts.max_new_tokens = req.max_completion_tokens or req.max_tokens or 0
    s = opts.sampling
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        value = getattr(req, name)
        if value is not None:
            setattr(s, name, value)
    if speech:
        greedy = req.temperature == 0.0
        opts.speech.CopyFrom(omni_pb2.SpeechOptions(enabled=True, output=omni_pb2.SPEECH_OUTPUT_AUDIO, greedy=greedy))
        if req.seed is not None:
            opts.speech.seed = req.seed
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return chat, ReplyFormat(req.stream, include_usage, req.audio.format if speech else None)


def _message(m: ChatMessage, where: str, chat: omni_pb2.ChatRequest) -> omni_pb2.Message:
    msg = omni_pb2.Message(role=ROLES[m.role])
    for j, part in enumerate(m.content):
        param = f"{where}.content[{j}]"
        if m.role == "assistant" and not isinstance(part, TextPart):
            raise InvalidParam(f"{param}: assistant messages carry text only", param)
        if isinstance(part, TextPart):
            msg.content.add(text=part.text)
        elif isinstance(part, ImagePart):
            msg.content.add(image=omni_pb2.Image(data=data_url_bytes(part.image_url.url, f"{param}.image_url.url")))
        elif m.role in ("system", "developer"):  # the reference voice
            if chat.reference_voice.pcm:
                raise InvalidParam(f"{param}: one reference voice per request", param)
            chat.reference_voice.CopyFrom(input_audio(part.input_audio.data, part.input_audio.format,
                                                      f"{param}.input_audio"))  # fmt: skip
        else:
            msg.content.add(audio=input_audio(part.input_audio.data, part.input_audio.format, f"{param}.input_audio"))
    return msg


# --- the answer ---------------------------------------------------------------------------------------------------


def usage(final: omni_pb2.FinalEvent) -> dict[str, int]:
    u = final.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


class Completion:
    """One answer's ids and timestamps, and its objects in OpenAI's shapes."""

    def __init__(self, fmt: ReplyFormat):
        self.fmt = fmt
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.audio_id = f"audio_{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _object(self, kind: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": MODEL_ID, "choices": choices,
                **extra}  # fmt: skip

    async def whole(self, events: AsyncIterator[omni_pb2.ChatEvent]) -> dict[str, Any]:
        """The `chat.completion` object of a finished answer."""
        pcm = bytearray()
        final = omni_pb2.FinalEvent()
        async for event in events:
            if event.HasField("audio"):
                pcm += pcm16_from_float(event.audio.pcm)
            elif event.HasField("final"):
                final = event.final
        message: dict[str, Any] = {"role": "assistant", "content": final.text, "refusal": None}
        if self.fmt.audio_format is not None:
            data = wav_file(bytes(pcm)) if self.fmt.audio_format == "wav" else bytes(pcm)
            # the text is the transcript of the speech (OpenAI's shape); the audio is not kept, so its id
            # cannot be referred to by a later request and it expires at once
            message["content"] = None
            message["audio"] = {"id": self.audio_id, "data": b64encode(data), "expires_at": self.created,
                                "transcript": final.text}  # fmt: skip
        choice = {"index": 0, "message": message, "finish_reason": FINISH_REASONS.get(final.finish_reason, "stop"),
                  "logprobs": None}  # fmt: skip
        return self._object("chat.completion", [choice], usage=usage(final))

    async def chunks(self, events: AsyncIterator[omni_pb2.ChatEvent]) -> AsyncIterator[dict[str, Any]]:
        """The `chat.completion.chunk` objects of a streamed answer: text deltas as `content` (text only) or as
        `audio.transcript` pieces (with speech), speech as `audio.data` pcm16 pieces, then the finish reason and,
        when asked for, the usage."""
        speech = self.fmt.audio_format is not None
        yield self._chunk({"role": "assistant", "content": None if speech else ""})
        async for event in events:
            kind = event.WhichOneof("event")
            if kind == "text_delta":
                if speech:
                    yield self._chunk({"audio": {"id": self.audio_id, "transcript": event.text_delta}})
                else:
                    yield self._chunk({"content": event.text_delta})
            elif kind == "audio" and event.audio.pcm:
                yield self._chunk(
                    {"audio": {"id": self.audio_id, "data": b64encode(pcm16_from_float(event.audio.pcm))}}
                )
            elif kind == "final":
                yield self._chunk({}, FINISH_REASONS.get(event.final.finish_reason, "stop"))
                if self.fmt.include_usage:
                    yield self._object("chat.completion.chunk", [], usage=usage(event.final))

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return self._object("chat.completion.chunk", [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                                       "logprobs": None}])  # fmt: skip
