"""Public request messages -> validated inputs of the pipeline: limits, enum values, audio, images, generation
options. Everything a caller sends is checked here, before any stage runs, and refused with the status the
error carries (`services.runtime.errors`): a malformed field is INVALID_ARGUMENT, a request over the server's
limits RESOURCE_EXHAUSTED. Images are counted first and then checked from their headers only (never decoded
here: the vision encoder decodes them, once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as config_dataclass

from protos.minicpmo.v1 import omni_pb2
from services.common.audio import SAMPLE_RATE, validate_pcm
from services.common.generation import SamplingParams
from services.common.image_layout import ImageProcessorConfig, probe_image
from services.gateway.prompts import AudioRef, ImageRef, Message, PlainText, system_prompt
from services.runtime.errors import InvalidArgument, ResourceExhausted


class InvalidRequest(InvalidArgument):
    """A request that is malformed as sent."""


class LimitExceeded(ResourceExhausted):
    """A request over this server's limits; the message names the limit."""


@config_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Limits:
    """What one request or session may use (the app's `limits` argument; unknown names are refused)."""

    max_prompt_tokens: int = 8192  # a chat prompt (live sessions roll their context instead)
    max_new_tokens: int = 2048
    max_messages: int = 64
    max_images: int = 16
    max_audio_seconds: float = 120.0  # per request (chat) / per AppendUnit call (live)
    max_frames_per_append: int = 32
    max_text_chars: int = 32768
    # A live session's KV: when it reaches the window it is rebuilt from its system prompt, its turns' text and
    # its latest units, at most `context_keep_tokens` (services/llm_core/context_window.py); the hard cap, for
    # what the window cannot drop (typed text of the turn in progress), is `max_session_tokens`.
    context_window_tokens: int = 6144
    context_keep_tokens: int = 3072
    max_session_tokens: int = 8192
    session_idle_ttl_s: int = 600
    # CreateSession placed on an LLMCore or AudioEncoder replica with no room for one more session tries again under
    # a new session id, which the routers send to other replicas (rendezvous over the ranks): with one replica each,
    # set 1.
    session_placement_attempts: int = 4
    # Live sessions one API key may hold at once (0: no quota), so that one tenant cannot take every replica's room.
    max_live_sessions_per_key: int = 0

    def __post_init__(self) -> None:
        if self.session_placement_attempts < 1:
            raise ValueError(f"limits need session_placement_attempts >= 1, got {self.session_placement_attempts}")
        if self.max_live_sessions_per_key < 0:
            raise ValueError(f"limits need max_live_sessions_per_key >= 0, got {self.max_live_sessions_per_key}")
        if not 0 < self.context_keep_tokens < self.context_window_tokens < self.max_session_tokens:
            raise ValueError(
                "limits need 0 < context_keep_tokens < context_window_tokens < max_session_tokens, got "
                f"{self.context_keep_tokens}, {self.context_window_tokens}, {self.max_session_tokens}"
            )


# Public enums -> internal names. Values outside these maps are refused (never silently defaulted).
ROLES = {
    omni_pb2.ROLE_UNSPECIFIED: "user",
    omni_pb2.ROLE_USER: "user",
    omni_pb2.ROLE_ASSISTANT: "assistant",
    omni_pb2.ROLE_SYSTEM: "system",
}
VOICE_MODES = {
    omni_pb2.VOICE_MODE_DEFAULT: "default",
    omni_pb2.VOICE_MODE_OMNI: "omni",
    omni_pb2.VOICE_MODE_AUDIO_ASSISTANT: "audio_assistant",
    omni_pb2.VOICE_MODE_AUDIO_ROLEPLAY: "audio_roleplay",
    omni_pb2.VOICE_MODE_VOICE_CLONING: "voice_cloning",
}
LANGUAGES = ("en", "zh")
_SAMPLE_FORMATS = {
    omni_pb2.SAMPLE_FORMAT_UNSPECIFIED: "<f4",
    omni_pb2.SAMPLE_FORMAT_FLOAT32: "<f4",
    omni_pb2.SAMPLE_FORMAT_INT16: "<i2",
}
_SPEECH_OUTPUTS = (
    omni_pb2.SPEECH_OUTPUT_UNSPECIFIED,
    omni_pb2.SPEECH_OUTPUT_AUDIO,
    omni_pb2.SPEECH_OUTPUT_CODES,
    omni_pb2.SPEECH_OUTPUT_BOTH,
)


def enum_name(mapping: dict[int, str], value: int, field: str) -> str:
    if value not in mapping:
        known = ", ".join(f"{k} ({v})" for k, v in mapping.items())
        raise InvalidRequest(f"{field} {value} is not a known value; use one of {known}")
    return mapping[value]


def voice_mode(value: int, field: str = "mode") -> str:
    return enum_name(VOICE_MODES, value, field)


def language(value: str) -> str:
    lang = value or "en"
    if lang not in LANGUAGES:
        raise InvalidRequest(f"language must be one of {LANGUAGES}, got {value!r}")
    return lang


def decode_pcm(audio: omni_pb2.Audio, max_seconds: float, field: str = "audio") -> np.ndarray:
    """Public Audio message -> mono float32 16 kHz (validated, resampled, loud audio scaled to full scale)."""
    dtype = _SAMPLE_FORMATS.get(audio.format)
    if dtype is None:
        raise InvalidRequest(f"{field}.format {audio.format} is not a known sample format (FLOAT32 or INT16)")
    if audio.sample_rate <= 0:
        raise InvalidRequest(f"{field}.sample_rate is required (samples per second of {field}.pcm, e.g. {SAMPLE_RATE})")
    size = np.dtype(dtype).itemsize
    if len(audio.pcm) % size:
        raise InvalidRequest(f"{field}.pcm has {len(audio.pcm)} bytes, not a whole number of {size}-byte samples")
    return validate_pcm(np.frombuffer(audio.pcm, dtype=dtype), audio.sample_rate, max_seconds=max_seconds)


def image_ref(data: bytes, key: int, cfg: ImageProcessorConfig) -> ImageRef:
    """An image's prompt reference from its header (size checked; the pixels are decoded by the encoder)."""
    return ImageRef(size_wh=probe_image(data, cfg), key=key)


def check_text(text: str, limits: Limits, field: str) -> str:
    if len(text) > limits.max_text_chars:
        raise LimitExceeded(f"{field}: text of {len(text)} chars; the limit is {limits.max_text_chars}")
    return text


def sampling_params(opts: omni_pb2.GenerationOptions, base: SamplingParams, limits: Limits) -> SamplingParams:
    """Public generation options over `base` (upstream's defaults); every value validated.

    `temperature: 0` means greedy (as OpenAI-style clients use it)."""
    s = opts.sampling
    changes: dict[str, Any] = {"greedy": s.greedy or (s.HasField("temperature") and s.temperature == 0.0)}
    if changes["greedy"]:
        changes["repetition_penalty"] = 1.0  # upstream's greedy runs pass 1.0 explicitly
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        if s.HasField(name) and not (name == "temperature" and s.temperature == 0.0):
            changes[name] = getattr(s, name)
    if opts.max_new_tokens < 0 or opts.min_new_tokens < 0:
        raise InvalidRequest("max_new_tokens and min_new_tokens must be >= 0")
    if opts.max_new_tokens > limits.max_new_tokens:
        raise LimitExceeded(f"max_new_tokens {opts.max_new_tokens} is over this server's limit of {limits.max_new_tokens}")
    changes["max_new_tokens"] = opts.max_new_tokens or min(base.max_new_tokens, limits.max_new_tokens)
    changes["min_new_tokens"] = opts.min_new_tokens
    if opts.speech.output not in _SPEECH_OUTPUTS:
        raise InvalidRequest(f"speech.output {opts.speech.output} is not a known value (AUDIO, CODES or BOTH)")
    return base.with_(**changes)


@dataclass
class ParsedChat:
    messages: list[Message]
    images: list[bytes]  # encoded files, prompt order
    clips: list[np.ndarray]  # one joined clip per message with audio (upstream merges a message's audios)
    omni_input: bool
    max_slice_nums: int | None


def parse_chat(request: omni_pb2.ChatRequest, limits: Limits, image_cfg: ImageProcessorConfig) -> ParsedChat:
    """A ChatRequest's messages as prompt content, its images and audio clips (all checked, none decoded)."""
    if not request.messages:
        raise InvalidRequest("messages is empty: send at least one user message")
    if len(request.messages) > limits.max_messages:
        raise LimitExceeded(f"{len(request.messages)} messages; the limit is {limits.max_messages}")
    n_images = sum(
        1 if p.WhichOneof("part") == "image" else len(p.video.frames) if p.WhichOneof("part") == "video" else 0
        for m in request.messages
        for p in m.content
    )
    if n_images > limits.max_images:  # counted before any image is looked at
        raise LimitExceeded(f"{n_images} images (video frames count); the limit is {limits.max_images}")
    has_video = any(p.WhichOneof("part") == "video" for m in request.messages for p in m.content)
    messages: list[Message] = []
    images: list[bytes] = []
    clips: list[np.ndarray] = []
    budget = _AudioBudget(limits.max_audio_seconds)
    if request.voice_mode != omni_pb2.VOICE_MODE_UNSPECIFIED:
        mode = voice_mode(request.voice_mode, "voice_mode")
        ref = None
        if request.reference_voice.pcm:
            pcm = budget.take(decode_pcm(request.reference_voice, limits.max_audio_seconds, "reference_voice"))
            ref = AudioRef(pcm.shape[0])
            clips.append(pcm)
        messages.append(system_prompt(mode, language(request.language), ref))
    for i, m in enumerate(request.messages):
        role = enum_name(ROLES, m.role, f"messages[{i}].role")
        content: list[Any] = []
        audio_parts: list[np.ndarray] = []
        for j, part in enumerate(m.content):
            kind = part.WhichOneof("part")
            where = f"messages[{i}].content[{j}]"
            if kind == "text":
                content.append(PlainText(check_text(part.text, limits, where)))  # never control tokens
            elif kind == "image":
                content.append(image_ref(part.image.data, len(images), image_cfg))
                images.append(part.image.data)
            elif kind == "audio":
                pcm = budget.take(decode_pcm(part.audio, limits.max_audio_seconds, f"{where}.audio"))
                content.append(AudioRef(pcm.shape[0]))
                audio_parts.append(pcm)
            elif kind == "video":
                _expand_video(part.video, content, images, audio_parts, budget, limits, image_cfg, where)
            else:
                raise InvalidRequest(f"{where} is empty (set text, image, audio or video)")
        if not content:
            raise InvalidRequest(f"messages[{i}] has no content")
        if audio_parts:
            clips.append(np.concatenate(audio_parts))
        messages.append(Message(role, content))
    max_slices = 1 if has_video else (request.max_slice_nums or None)
    if max_slices is not None and not 1 <= max_slices <= image_cfg.max_slice_nums:
        raise InvalidRequest(f"max_slice_nums must be in 1..{image_cfg.max_slice_nums}, got {max_slices}")
    return ParsedChat(messages, images, clips, has_video, max_slices)


class _AudioBudget:
    """Seconds of audio a request may carry in all."""

    def __init__(self, seconds: float):
        self.left = seconds
        self.limit = seconds

    def take(self, pcm: np.ndarray) -> np.ndarray:
        self.left -= pcm.shape[0] / SAMPLE_RATE
        if self.left < 0:
            raise LimitExceeded(f"more than {self.limit:g} s of audio in one request; send less audio")
        return pcm


def _expand_video(video: omni_pb2.Video, content: list, images: list[bytes], audio_parts: list,
                  budget: _AudioBudget, limits: Limits, image_cfg: ImageProcessorConfig, where: str) -> None:  # fmt: skip
    """1 s units as upstream's video example: `<unit>`, frame i, audio second i."""
    if not video.frames:
        raise InvalidRequest(f"{where}.video has no frames (send one frame per second)")
    pcm = np.zeros(0, np.float32)
    if video.audio.pcm:
        pcm = budget.take(decode_pcm(video.audio, limits.max_audio_seconds, f"{where}.video.audio"))
    for i, frame in enumerate(video.frames):
        content.append("<unit>")
        content.append(image_ref(frame.data, len(images), image_cfg))
        images.append(frame.data)
        second = pcm[SAMPLE_RATE * i : SAMPLE_RATE * (i + 1)]
        if second.shape[0]:
            content.append(AudioRef(second.shape[0]))
            audio_parts.append(second)
