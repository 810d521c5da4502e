"""The Realtime API's client events, as this server takes them, and the session configuration they set.

Events follow OpenAI's Realtime protocol (the GA shapes: `session.audio.input.turn_detection`, `audio/pcm`
formats, `output_modalities`). Every event is validated (pydantic, unknown fields refused), so a client learns
at once, with the field named, that something it asked for is not something this model does.

Extensions (documented in the README): `session.audio.output.voice` is an upstream voice mode (default, omni,
audio_assistant, audio_roleplay, voice_cloning); `session.audio.output.reference_voice` ({data: base64,
format: "wav" | "pcm16"}) is the voice to clone; `session.temperature` / `response.temperature` (0 = greedy, as
the beta protocol had it); `audio/pcm` input also at rate 16000.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from protos.minicpmo.v1 import omni_pb2
from services.common.generation import STREAMING_DEFAULTS
from services.gateway.openai.chat_completions import MODEL_ID, VOICES, check_model
from services.gateway.openai.errors import validation_error
from services.gateway.openai.media import InvalidParam, input_audio
from services.gateway.openai.vad import VadSettings
from services.gateway.requests import Limits, check_text, decode_pcm, sampling_params

INPUT_RATES = (24000, 16000)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputFormat(_Strict):
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: Literal[24000, 16000] = 24000


class OutputFormat(_Strict):
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: Literal[24000] = 24000


class ServerVad(_Strict):
    type: Literal["server_vad"]
    threshold: float = 0.5
    silence_duration_ms: int = 500
    prefix_padding_ms: int = 300
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: None = None


class ReferenceVoice(_Strict):
    data: str
    format: Literal["wav", "pcm16"]


class InputAudioConfig(_Strict):
    format: InputFormat | None = None
    turn_detection: ServerVad | None = None  # null turns it off (the client commits and asks for answers)
    transcription: None = None
    noise_reduction: None = None


class OutputAudioConfig(_Strict):
    format: OutputFormat | None = None
    voice: str | None = None
    reference_voice: ReferenceVoice | None = None


class AudioConfig(_Strict):
    input: InputAudioConfig | None = None
    output: OutputAudioConfig | None = None


Modalities = Annotated[list[Literal["text", "audio"]], Field(min_length=1, max_length=1)]
MaxTokens = Annotated[int, Field(ge=1)] | Literal["inf"]


class SessionFields(_Strict):
    type: Literal["realtime"] = "realtime"
    model: str | None = None
    instructions: str | None = None
    output_modalities: Modalities | None = None
    audio: AudioConfig | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)


class ResponseFields(_Strict):
    output_modalities: Modalities | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)


class _Event(_Strict):
    event_id: str | None = None


class SessionUpdate(_Event):
    type: Literal["session.update"]
    session: SessionFields


class AudioAppend(_Event):
    type: Literal["input_audio_buffer.append"]
    audio: str


class AudioCommit(_Event):
    type: Literal["input_audio_buffer.commit"]


class AudioClear(_Event):
    type: Literal["input_audio_buffer.clear"]


class InputText(_Strict):
    type: Literal["input_text"]
    text: str


class InputImage(_Strict):
    type: Literal["input_image"]
    image_url: str
    detail: Literal["auto", "low", "high"] = "auto"


class InputAudio(_Strict):
    type: Literal["input_audio"]
    audio: str


class UserMessage(_Strict):
    id: str | None = None
    type: Literal["message"]
    role: Literal["user"]
    content: list[Annotated[InputText | InputImage | InputAudio, Field(discriminator="type")]] = Field(min_length=1)


class ItemCreate(_Event):
    type: Literal["conversation.item.create"]
    previous_item_id: str | None = None
    item: UserMessage


class ResponseCreate(_Event):
    type: Literal["response.create"]
    response: ResponseFields | None = None


class ResponseCancel(_Event):
    type: Literal["response.cancel"]
    response_id: str | None = None


ClientEvent = Annotated[
    SessionUpdate | AudioAppend | AudioCommit | AudioClear | ItemCreate | ResponseCreate | ResponseCancel,
    Field(discriminator="type"),
]
_EVENTS = TypeAdapter(ClientEvent)


def parse_event(text: str) -> tuple[Any, str | None]:
    """(event, the client's event_id) of one text frame; InvalidParam when it is not a valid event."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidParam(f"the frame is not JSON ({e.msg} at char {e.pos}): send one JSON event per frame") from None
    event_id = raw.get("event_id") if isinstance(raw, dict) and isinstance(raw.get("event_id"), str) else None
    try:
        return _EVENTS.validate_python(raw), event_id
    except ValidationError as e:
        raise validation_error(e) from None


@dataclass
class SessionConfig:
    """What `session.update` sets (`updated`); the voice and the instructions are fixed once the live session
    exists (they are its system prompt)."""

    voice: str = "omni"
    instructions: str = ""  # appended to the voice mode's system prompt
    reference_voice: omni_pb2.Audio | None = None
    output_modalities: tuple[str, ...] = ("audio",)
    input_rate: int = 24000
    turn_detection: ServerVad | None = field(default_factory=lambda: ServerVad(type="server_vad"))
    max_output_tokens: MaxTokens = "inf"
    temperature: float | None = None

    def updated(self, update: SessionFields, started: bool, limits: Limits) -> SessionConfig:
        """This configuration with `update` applied, every value checked (nothing changes on a refusal);
        `started`: the live session exists (its system prompt, with the voice, is in)."""
        if update.model is not None:
            check_model(update.model)
        changes: dict[str, Any] = {}
        if update.instructions is not None and update.instructions != self.instructions:
            if started:
                raise InvalidParam("instructions are part of the system prompt, which is fixed once the "
                                   "conversation has started: set them in the first session.update",
                                   "session.instructions")  # fmt: skip
            changes["instructions"] = check_text(update.instructions, limits, "session.instructions")
        audio = update.audio or AudioConfig()
        inp, out = audio.input or InputAudioConfig(), audio.output or OutputAudioConfig()
        if out.voice is not None and out.voice != self.voice:
            if out.voice not in VOICES:
                raise InvalidParam(f"voice {out.voice!r} is not a voice here; use one of {list(VOICES)}",
                                   "session.audio.output.voice")  # fmt: skip
            changes["voice"] = out.voice
        if out.reference_voice is not None:
            param = "session.audio.output.reference_voice"
            changes["reference_voice"] = input_audio(out.reference_voice.data, out.reference_voice.format, param)
            decode_pcm(changes["reference_voice"], limits.max_audio_seconds, param)  # refused now, not at start
        if started and changes:
            raise InvalidParam("the voice is fixed once the conversation has started (its system prompt is in)",
                               "session.audio.output")  # fmt: skip
        if "turn_detection" in inp.model_fields_set:
            changes["turn_detection"] = inp.turn_detection
        if inp.format is not None:
            changes["input_rate"] = inp.format.rate
        if update.output_modalities is not None:
            changes["output_modalities"] = tuple(update.output_modalities)
        if update.max_output_tokens is not None:
            changes["max_output_tokens"] = update.max_output_tokens
        if "temperature" in update.model_fields_set:
            changes["temperature"] = update.temperature
        new = dataclasses.replace(self, **changes)
        new.vad_settings()  # range checks
        sampling_params(new.options(), STREAMING_DEFAULTS, limits)  # e.g. max_output_tokens over the limit
        return new

    def vad_settings(self) -> VadSettings | None:
        vad = self.turn_detection
        return None if vad is None else VadSettings(vad.threshold, vad.silence_duration_ms, vad.prefix_padding_ms)

    def options(self, response: ResponseFields | None = None) -> omni_pb2.GenerationOptions:
        """The generation options of one answer (the session's, with the response's overrides)."""
        r = response or ResponseFields()
        modalities = r.output_modalities or self.output_modalities
        max_tokens = r.max_output_tokens if r.max_output_tokens is not None else self.max_output_tokens
        temperature = r.temperature if r.temperature is not None else self.temperature
        opts = omni_pb2.GenerationOptions(max_new_tokens=0 if max_tokens == "inf" else max_tokens)
        if temperature is not None:
            opts.sampling.temperature = temperature  # 0 = greedy
        if "audio" in modalities:
            opts.speech.CopyFrom(omni_pb2.SpeechOptions(enabled=True, output=omni_pb2.SPEECH_OUTPUT_AUDIO,
                                                        greedy=temperature == 0.0))  # fmt: skip
        return opts

    def create_request(self) -> omni_pb2.CreateSessionRequest:
        req = omni_pb2.CreateSessionRequest(mode=VOICES[self.voice], options=self.options(),
                                            instructions=self.instructions)
        if self.reference_voice is not None:
            req.reference_voice.CopyFrom(self.reference_voice)
        return req

    def to_json(self, session_id: str) -> dict[str, Any]:
        """The session object of `session.created` / `session.updated`."""
        vad = self.turn_detection.model_dump() if self.turn_detection is not None else None
        session = {
            "type": "realtime", "object": "realtime.session", "id": session_id, "model": MODEL_ID,
            "output_modalities": list(self.output_modalities), "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": self.input_rate}, "turn_detection": vad,
                          "transcription": None, "noise_reduction": None},
                "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": self.voice},
            },
        }  # fmt: skip
        if self.temperature is not None:
            session["temperature"] = self.temperature
        return session
