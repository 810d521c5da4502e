"""Prompts exactly as upstream builds them: messages, chat templates, placeholders, bounds, system prompts and
the prefixes of streaming (live) sessions.

Pure string/id work on top of the tokenizer (no model code), so the gateway can run it cheaply. The flow of
upstream `chat`: each message's content list becomes one string (images -> `(<image>./</image>)`, audio ->
`(<audio>./</audio>)`, joined with "" in omni mode, else "\\n"), the list is rendered with a chat template, each
tag is replaced by its placeholder (`<unk>` rows that the encoders' outputs later overwrite), the text is
tokenized, and the bounds of those rows are read off the token ids.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from transformers import PreTrainedTokenizerFast

from services.audio_encoder.processor import audio_placeholder
from services.gateway.tokenizer import SpecialTokens
from services.vision_encoder.processor import ImageProcessorConfig, image_placeholder, slice_layout

IMAGE_TAG = "(<image>./</image>)"
AUDIO_TAG = "(<audio>./</audio>)"
_TAG_SPLIT = re.compile(f"({re.escape(IMAGE_TAG)}|{re.escape(AUDIO_TAG)})")

# upstream `default_tts_chat_template`: ChatML without a default system prompt, with the speaker/TTS prefix
DEFAULT_TTS_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|>"
    "<|tts_bos|>' }}{% endif %}"
)
# appended by upstream `streaming_generate` to close the user turn and open the answer
ASSISTANT_PREFIX = "<|im_end|>\n<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>"

Role = Literal["system", "user", "assistant"]
ROLES = ("system", "user", "assistant")


class PromptError(ValueError):
    """A request whose messages cannot be turned into a prompt; the message says what to change."""


@dataclass(frozen=True)
class ImageRef:
    """An image (or video frame) in a message. `size_wh` is the size the vision encoder will slice (after any
    downscaling at load); `key` lets the caller match encoder outputs to it."""

    size_wh: tuple[int, int]
    key: object = None


@dataclass(frozen=True)
class AudioRef:
    """A 16 kHz mono audio clip in a message, by length; `key` as for ImageRef."""

    num_samples: int
    key: object = None


Content = str | ImageRef | AudioRef


@dataclass
class Message:
    role: Role
    content: list[Content] | str

    def parts(self) -> list[Content]:
        return [self.content] if isinstance(self.content, str) else list(self.content)


@dataclass
class Prompt:
    """A tokenized prompt; bounds are [start, end) rows of `input_ids` that encoder outputs fill."""

    text: str  # after placeholder expansion
    rendered: str  # before it: the template output with `(<image>./</image>)` / `(<audio>./</audio>)` tags
    input_ids: list[int]
    image_bounds: list[tuple[int, int]]
    audio_bounds: list[tuple[int, int]]
    spk_bounds: list[tuple[int, int]]
    images: list[ImageRef] = field(default_factory=list)  # in prompt order
    audios: list[AudioRef] = field(default_factory=list)  # in prompt order
    audio_messages: list[int] = field(default_factory=list)  # message index of each audio (upstream merges
    # consecutive audios of one message into one clip before Whisper)

    def __len__(self) -> int:
        return len(self.input_ids)

    def audio_clips(self) -> list[list[int]]:
        """Indices of the audios encoded together: upstream joins consecutive audios of one message into a
        single clip before Whisper (`audio_parts`); the clips' embeddings, concatenated in order, fill
        `audio_bounds` one after another."""
        clips: list[list[int]] = []
        for i, m in enumerate(self.audio_messages):
            if clips and self.audio_messages[clips[-1][-1]] == m:
                clips[-1].append(i)
            else:
                clips.append([i])
        return clips


# --- placeholders -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlaceholderSettings:
    """What the image/audio placeholders depend on: the image processor config (from preprocessor_config.json)
    and upstream's per-call `max_slice_nums` (None: the config's), `use_image_id` and `chunk_input`."""

    image: ImageProcessorConfig = ImageProcessorConfig()
    max_slice_nums: int | None = None
    use_image_id: bool = True
    chunk_input: bool = True

    @classmethod
    def chat(
        cls, image: ImageProcessorConfig, max_slice_nums: int | None = None, use_image_id: bool | None = None
    ) -> "PlaceholderSettings":
        """Upstream `chat`: max_slice_nums / use_image_id default to the processor config's."""
        return cls(image, max_slice_nums, image.use_image_id if use_image_id is None else use_image_id, True)

    @classmethod
    def streaming(cls, image: ImageProcessorConfig, max_slice_nums: int | None = None) -> "PlaceholderSettings":
        """`streaming_prefill`: 1 slice unless asked, no image ids, chunked audio."""
        return cls(image, max_slice_nums or 1, False, True)


def expand_placeholders(
    text: str, images: Sequence[ImageRef], audios: Sequence[AudioRef], ps: PlaceholderSettings
) -> str:
    """Replace the i-th image tag by image i's slice placeholder and the j-th audio tag by audio j's."""
    chunks = _TAG_SPLIT.split(text)
    n_img = sum(c == IMAGE_TAG for c in chunks)
    n_aud = sum(c == AUDIO_TAG for c in chunks)
    if n_img != len(images) or n_aud != len(audios):
        raise PromptError(
            f"the prompt has {n_img} image and {n_aud} audio tags but {len(images)} images and {len(audios)} "
            f"audios were given (do not type {IMAGE_TAG!r} or {AUDIO_TAG!r} in text)"
        )
    i = j = 0
    for k, c in enumerate(chunks):
        if c == IMAGE_TAG:
            layout = slice_layout(images[i].size_wh, ps.max_slice_nums, ps.image)
            chunks[k] = image_placeholder(layout, i, ps.use_image_id, ps.image.query_num)
            i += 1
        elif c == AUDIO_TAG:
            chunks[k] = audio_placeholder(audios[j].num_samples, ps.chunk_input)
            j += 1
    return "".join(chunks)


# --- bounds -----------------------------------------------------------------------------------------------------


def _pairs(ids: Sequence[int], starts: set[int], ends: set[int], what: str) -> list[tuple[int, int]]:
    s = [i + 1 for i, t in enumerate(ids) if t in starts]
    e = [i for i, t in enumerate(ids) if t in ends]
    if len(s) != len(e) or any(a > b for a, b in zip(s, e)):
        raise PromptError(f"unbalanced {what} markers in the prompt (starts at {s[:5]}, ends at {e[:5]})")
    return list(zip(s, e))


def image_bounds(ids: Sequence[int], sp: SpecialTokens) -> list[tuple[int, int]]:
    """Rows between `<image>`/`<slice>` and `</image>`/`</slice>` (one bound per image or slice)."""
    return _pairs(ids, {sp.image_start, sp.slice_start}, {sp.image_end, sp.slice_end}, "image/slice")


def audio_bounds(ids: Sequence[int], sp: SpecialTokens) -> list[tuple[int, int]]:
    """Rows between `<|audio_start|>` and `<|audio_end|>` (one bound per 1 s chunk when chunked)."""
    return _pairs(ids, {sp.audio_start}, {sp.audio_end}, "audio")


def spk_bounds(ids: Sequence[int], sp: SpecialTokens) -> list[tuple[int, int]]:
    """Rows between `<|spk_bos|>` and `<|spk_eos|>`, i.e. the `<|spk|>` position whose hidden state feeds TTS."""
    return _pairs(ids, {sp.spk_bos}, {sp.spk_eos}, "speaker")


def tokenize_prompt(
    text: str,
    tokenizer: PreTrainedTokenizerFast,
    images: Sequence[ImageRef] = (),
    audios: Sequence[AudioRef] = (),
    audio_messages: Sequence[int] = (),
    settings: PlaceholderSettings = PlaceholderSettings(),
) -> Prompt:
    """Expand the tags of a rendered prompt, tokenize it and compute its bounds."""
    final = expand_placeholders(text, images, audios, settings)
    ids = tokenizer.encode(final, add_special_tokens=False)
    sp = SpecialTokens.from_tokenizer(tokenizer)
    return Prompt(
        text=final,
        rendered=text,
        input_ids=ids,
        image_bounds=image_bounds(ids, sp),
        audio_bounds=audio_bounds(ids, sp),
        spk_bounds=spk_bounds(ids, sp),
        images=list(images),
        audios=list(audios),
        audio_messages=list(audio_messages) or [0] * len(audios),
    )


# --- chat -------------------------------------------------------------------------------------------------------


def message_text(msg: Message, omni_input: bool) -> tuple[str, list[ImageRef], list[AudioRef]]:
    """One message's content as upstream flattens it: tags for media, joined with "" (omni) or "\\n"."""
    parts: list[str] = []
    images: list[ImageRef] = []
    audios: list[AudioRef] = []
    for c in msg.parts():
        if isinstance(c, ImageRef):
            images.append(c)
            parts.append(IMAGE_TAG)
        elif isinstance(c, AudioRef):
            audios.append(c)
            parts.append(AUDIO_TAG)
        elif isinstance(c, str):
            parts.append(c)
        else:
            raise PromptError(f"unsupported content item of type {type(c).__name__} in a {msg.role} message")
    return ("" if omni_input else "\n").join(parts), images, audios


def build_chat_prompt(
    messages: Sequence[Message],
    tokenizer: PreTrainedTokenizerFast,
    settings: PlaceholderSettings,
    omni_input: bool = False,
    use_tts_template: bool = False,
) -> Prompt:
    """Upstream `chat`'s prompt: any audio forces the TTS template; otherwise the tokenizer's own template
    (Qwen2.5, which adds its default system prompt when the first message is not `system`)."""
    if not messages:
        raise PromptError("messages are empty")
    rendered: list[dict[str, str]] = []
    images: list[ImageRef] = []
    audios: list[AudioRef] = []
    audio_messages: list[int] = []
    for i, msg in enumerate(messages):
        if msg.role not in ROLES:
            raise PromptError(f"message {i}: role must be one of {ROLES}, got {msg.role!r}")
        if i == 0 and msg.role == "assistant":
            raise PromptError("the first message must have role 'user' or 'system'")
        text, imgs, auds = message_text(msg, omni_input)
        images += imgs
        audios += auds
        audio_messages += [i] * len(auds)
        rendered.append({"role": msg.role, "content": text})
    use_tts_template = use_tts_template or bool(audios)
    text = tokenizer.apply_chat_template(
        rendered,
        tokenize=False,
        add_generation_prompt=True,
        chat_template=DEFAULT_TTS_CHAT_TEMPLATE if use_tts_template else None,
    )
    return tokenize_prompt(text, tokenizer, images, audios, audio_messages, settings)


# --- system prompts (upstream `get_sys_prompt`) ------------------------------------------------------------------

Mode = Literal["default", "omni", "audio_assistant", "audio_roleplay", "voice_cloning"]
MODES = ("default", "omni", "audio_assistant", "audio_roleplay", "voice_cloning")
_CLONE_ZH = "模仿输入音频中的声音特征。"
_CLONE_EN = "Clone the voice in the provided audio prompt."
_ASSISTANT_ZH = "作为助手，你将使用这种声音风格说话。"
_ASSISTANT_EN = "As an assistant, you will speak using this voice style."
_DEFAULT_VOICE = "Use the <reserved_53> voice."
_OMNI_ZH = "你是一个AI助手。你能接受视频，音频和文本输入并输出语音和文本。"
_OMNI_EN = "You are a helpful assistant. You can accept video, audio and text input and output voice and text. "
# (prefix with ref audio, suffix) per mode and language; the audio_assistant en pair is upstream's later revision
_VOICE_PROMPTS = {
    ("omni", "zh"): (_OMNI_ZH + _CLONE_ZH, _ASSISTANT_ZH),
    ("omni", "en"): (_OMNI_EN + _CLONE_EN, _ASSISTANT_EN),
    ("audio_assistant", "zh"): (_CLONE_ZH, _ASSISTANT_ZH),
    ("audio_assistant", "en"): (
        "Use the voice in the audio prompt to synthesize new content.",
        "You are a helpful assistant with the above voice style.",
    ),
    ("audio_roleplay", "zh"): (_CLONE_ZH, "假装你是上述音频中的人物，与我进行对话。"),
    ("audio_roleplay", "en"): (_CLONE_EN, "Try to role-play the character based on the audio prompt above."),
}
_DEFAULT_SYSTEM = "You are a helpful assistant. You can accept audio and text input and output voice and text."


def system_prompt(mode: str = "default", language: str = "zh", ref_audio: AudioRef | None = None) -> Message:
    """The system message of a mode (sent with role "user", as upstream). The reference voice goes in as audio.

    Any language other than "zh" gets the English prompts; an unknown mode gets the default prompt (upstream).
    """
    lang = "zh" if language == "zh" else "en"
    if mode == "voice_cloning":
        if ref_audio is None:
            raise PromptError("voice_cloning mode needs a reference voice (ref_audio); none was given")
        return Message("user", [_CLONE_ZH if lang == "zh" else _CLONE_EN, ref_audio])
    if mode == "omni":
        prefix, suffix = _VOICE_PROMPTS[(mode, lang)]
        if ref_audio is None:
            return Message("user", [_OMNI_ZH if lang == "zh" else _OMNI_EN])
        return Message("user", [prefix, ref_audio, suffix])
    if mode in ("audio_assistant", "audio_roleplay"):
        prefix, suffix = _VOICE_PROMPTS[(mode, lang)]
        if ref_audio is None:
            return Message("user", [_DEFAULT_VOICE, suffix])
        return Message("user", [prefix, ref_audio, suffix])
    return Message("user", [_DEFAULT_SYSTEM])


# --- streaming (live) sessions -----------------------------------------------------------------------------------

After = Literal["system", "answer", "interrupt"]


def user_turn_prefix(after: After | None) -> str:
    """What precedes the first user chunk of a turn: after the system message (or any non-answer), after a
    finished answer, after an interrupted one (`<|tts_eos|>` closes the cut speech); "" for later chunks."""
    if after is None:
        return ""
    if after == "system":
        return "<|im_start|>user\n"
    if after == "answer":
        return "<|im_end|>\n<|im_start|>user\n"
    if after == "interrupt":
        return "<|tts_eos|><|im_end|>\n<|im_start|>user\n"
    raise PromptError(f"unknown turn boundary {after!r}")


@dataclass
class StreamingPromptState:
    """Upstream's per-session prompt flags (`is_first`, `new_user_msg`, `llm_generated`,
    `llm_generate_completed`), explicit and serialisable, so any replica can continue a session."""

    started: bool = False
    new_user_msg: bool = True
    generated: bool = False
    completed: bool = False

    def next_prefix(self, role: Role) -> tuple[bool, str]:
        """(render with the TTS template as a new session?, prefix) for the next prefilled message; updates state."""
        if not self.started:
            self.started = True
            if role in ("system", "assistant"):
                self.new_user_msg = True
            return True, ""
        prefix = ""
        if self.new_user_msg and role == "user":
            if not self.generated:
                prefix = user_turn_prefix("system")
            else:
                prefix = user_turn_prefix("answer" if self.completed else "interrupt")
            self.new_user_msg = False
        if role in ("system", "assistant"):
            self.new_user_msg = True
        return False, prefix

    def on_generate(self) -> None:
        """An answer starts (upstream `streaming_generate`)."""
        self.new_user_msg = True
        self.generated = True
        self.completed = False

    def on_generate_end(self, stopped_on_eos: bool) -> None:
        """The answer ended; only a stop token counts as completed (max tokens or an interrupt do not)."""
        self.completed = stopped_on_eos


def build_streaming_prefill(
    msg: Message,
    state: StreamingPromptState,
    tokenizer: PreTrainedTokenizerFast,
    settings: PlaceholderSettings,
    omni_input: bool = True,
) -> Prompt:
    """The tokens one `streaming_prefill` call adds to the session (exactly one message per call).

    `settings` should come from `PlaceholderSettings.streaming(cfg)`."""
    if msg.role not in ROLES:
        raise PromptError(f"role must be one of {ROLES}, got {msg.role!r}")
    text, images, audios = message_text(msg, omni_input)
    first, prefix = state.next_prefix(msg.role)
    if first:
        text = tokenizer.apply_chat_template(
            [{"role": msg.role, "content": text}],
            tokenize=False,
            add_generation_prompt=False,
            chat_template=DEFAULT_TTS_CHAT_TEMPLATE,
        )
    else:
        text = prefix + text
    return tokenize_prompt(text, tokenizer, images, audios, [0] * len(audios), settings)


def assistant_prefix(tokenizer: PreTrainedTokenizerFast) -> Prompt:
    """The answer prefix `streaming_generate` appends; its spk bound marks the speaker hidden state."""
    return tokenize_prompt(ASSISTANT_PREFIX, tokenizer)
