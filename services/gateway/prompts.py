"""Prompts exactly as upstream builds them: messages, chat templates, placeholders, bounds, system prompts and
the prefixes of streaming (live) sessions.

Pure string/id work on top of the tokenizer (no model code), so the gateway can run it cheaply. The flow of
upstream `chat`: each message's content list becomes one string (images -> `(<image>./</image>)`, audio ->
`(<audio>./</audio>)`, joined with "" in omni mode, else "\n"), the list is rendered with a chat template, each
tag is replaced by its placeholder (`<unk>` rows that the encoders' outputs later overwrite), the text is
tokenized, and the bounds of those rows are read off the token ids.

One deliberate difference: upstream tokenizes the whole string at once, so a user who TYPES `<|im_end|>` or
`<unit>` gets the control token itself (prompt injection). Here a message's content is a list of segments:
`str` is markup the server writes (system prompts, `<unit>`; tokenized as upstream, control tokens and all),
`PlainText` is what a caller typed (never a control token). The prompt is split at the control tokens the
server put there and every text run between them is tokenized with special tokens off. For text without
control-token strings this gives exactly upstream's ids (HF tokenizers split at added tokens first and encode
the runs between them independently); for typed control strings it gives their plain-text ids.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from transformers import PreTrainedTokenizerFast

from services.common.audio import audio_placeholder
from services.common.image_layout import ImageProcessorConfig, image_placeholder, slice_layout
from services.gateway.tokenizer import SpecialTokens
from services.runtime.errors import InvalidArgument

IMAGE_TAG = "(<image>./</image>)"
AUDIO_TAG = "(<audio>./</audio>)"
UNIT = "<unit>"  # the live unit marker (markup: tokenized as the control token)

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


class PromptError(InvalidArgument):
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


@dataclass(frozen=True)
class PlainText:
    """Text a caller typed: always tokenized as plain text, never as control tokens."""

    text: str


Content = str | PlainText | ImageRef | AudioRef
Segment = str | PlainText  # after placeholder expansion: markup or typed text


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
    close_tokens: int = 0  # live prefills: leading ids that close the previous answer
    open_tokens: int = 0  # then the ids that open a user turn

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


def expand_placeholders(content: Sequence[Content], ps: PlaceholderSettings, first_image: int = 0) -> list[Segment]:
    """Images and audio replaced by their placeholder markup (image ids count from `first_image`)."""
    out: list[Segment] = []
    i = first_image
    for c in content:
        if isinstance(c, ImageRef):
            layout = slice_layout(c.size_wh, ps.max_slice_nums, ps.image)
            out.append(image_placeholder(layout, i, ps.use_image_id, ps.image.query_num))
            i += 1
        elif isinstance(c, AudioRef):
            out.append(audio_placeholder(c.num_samples, ps.chunk_input))
        else:
            out.append(c)
    return out


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


# --- tokenization -----------------------------------------------------------------------------------------------


# Built once per tokenizer and markup string: transformers rebuilds its added vocabulary on every
# `get_added_vocab()`, and these ran for every live unit, which made them most of the unit's tokenization time.
# The caches hold the gateway's one tokenizer (a few in the tests) and the markup the server writes (templates,
# role headers, placeholders: a small set of strings), bounded in case a caller's text ever reaches them.


@functools.lru_cache(maxsize=8)
def _added_tokens(tokenizer: PreTrainedTokenizerFast) -> tuple[dict[str, int], re.Pattern[str], SpecialTokens]:
    """The added tokens (what HF splits a string at before BPE) with their ids, a pattern matching them longest
    first, and the special ids."""
    vocab = tokenizer.get_added_vocab()
    pattern = re.compile("|".join(re.escape(t) for t in sorted(vocab, key=len, reverse=True)))
    return vocab, pattern, SpecialTokens.from_tokenizer(tokenizer)


@functools.lru_cache(maxsize=1024)
def _split_markup(tokenizer: PreTrainedTokenizerFast, markup: str) -> tuple[str | tuple[int, ...], ...]:
    """`markup` as its texts between control tokens and the ids of each run of control tokens, in order (empty
    texts left out: a unit's 64 image placeholders are one run)."""
    vocab, pattern, _ = _added_tokens(tokenizer)
    pieces: list[str | tuple[int, ...]] = []
    pos = 0
    for m in pattern.finditer(markup):
        if m.start() > pos:
            pieces.append(markup[pos : m.start()])
        token = vocab[m.group(0)]
        if pieces and isinstance(pieces[-1], tuple):
            pieces[-1] += (token,)
        else:
            pieces.append((token,))
        pos = m.end()
    if pos < len(markup):
        pieces.append(markup[pos:])
    return tuple(pieces)


def encode_segments(segments: Sequence[Segment], tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Token ids of markup (control tokens recognised) and typed text (never control tokens), see module doc.
    Text runs on across segments until a control token: it is BPE-encoded as one string, as upstream does."""
    ids: list[int] = []
    text: list[str] = []

    def flush() -> None:  # an encode call costs ~40 us even for ""
        if joined := "".join(text):
            ids.extend(tokenizer.encode(joined, add_special_tokens=False, split_special_tokens=True))
        text.clear()

    for seg in segments:
        if isinstance(seg, PlainText):
            text.append(seg.text)
            continue
        for piece in _split_markup(tokenizer, seg):
            if isinstance(piece, str):
                text.append(piece)
            else:
                flush()
                ids.extend(piece)
    flush()
    return ids


def _check_markup(content: Sequence[Content]) -> None:
    for c in content:
        if isinstance(c, str) and (IMAGE_TAG in c or AUDIO_TAG in c):
            raise PromptError(
                f"media tags {IMAGE_TAG!r} / {AUDIO_TAG!r} in markup text; pass images and audio as ImageRef/AudioRef"
            )
        if not isinstance(c, (str, PlainText, ImageRef, AudioRef)):
            raise PromptError(f"unsupported content item of type {type(c).__name__}")


def _display(segments: Sequence[Content]) -> str:
    """The segments as one string (typed text verbatim, media as their tags): `Prompt.rendered`."""
    tags = {ImageRef: IMAGE_TAG, AudioRef: AUDIO_TAG}
    return "".join(c.text if isinstance(c, PlainText) else tags.get(type(c), c) for c in segments)  # type: ignore[arg-type]


def tokenize_prompt(
    content: Sequence[Content],
    tokenizer: PreTrainedTokenizerFast,
    audio_messages: Sequence[int] = (),
    settings: PlaceholderSettings = PlaceholderSettings(),
) -> Prompt:
    """Expand the placeholders of a rendered prompt, tokenize it and compute its bounds."""
    _check_markup(content)
    segments = expand_placeholders(content, settings)
    ids = encode_segments(segments, tokenizer)
    sp = _added_tokens(tokenizer)[2]
    images = [c for c in content if isinstance(c, ImageRef)]
    audios = [c for c in content if isinstance(c, AudioRef)]
    return Prompt(
        text=_display(segments),
        rendered=_display(content),
        input_ids=ids,
        image_bounds=image_bounds(ids, sp),
        audio_bounds=audio_bounds(ids, sp),
        spk_bounds=spk_bounds(ids, sp),
        images=images,
        audios=audios,
        audio_messages=list(audio_messages) or [0] * len(audios),
    )


# --- chat -------------------------------------------------------------------------------------------------------


def message_content(msg: Message, omni_input: bool) -> list[Content]:
    """One message's content as upstream flattens it: its parts joined with "" (omni) or "\n"."""
    parts = msg.parts()
    _check_markup(parts)
    sep = "" if omni_input else "\n"
    out: list[Content] = []
    for i, c in enumerate(parts):
        if i and sep:
            out.append(sep)
        out.append(c)
    return out


def render_template(
    tokenizer: PreTrainedTokenizerFast,
    messages: Sequence[tuple[str, list[Content]]],
    template: str | None,
    add_generation_prompt: bool,
) -> list[Content]:
    """A chat template applied to (role, content) messages, with every message's content kept as its segments
    (the template only ever sees a placeholder for it, so typed text never passes through the template)."""
    nonce = uuid.uuid4().hex
    slots = [f"\x00{nonce}:{i}\x00" for i in range(len(messages))]
    text = tokenizer.apply_chat_template(
        [{"role": role, "content": slot} for (role, _), slot in zip(messages, slots)],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        chat_template=template,
    )
    out: list[Content] = []
    for (_, content), slot in zip(messages, slots):
        before, found, text = text.partition(slot)
        if not found:
            raise PromptError("the chat template dropped a message")
        out.append(before)
        out.extend(content)
    out.append(text)
    return [c for c in out if c != ""]


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
    rendered: list[tuple[str, list[Content]]] = []
    audio_messages: list[int] = []
    for i, msg in enumerate(messages):
        if msg.role not in ROLES:
            raise PromptError(f"message {i}: role must be one of {ROLES}, got {msg.role!r}")
        if i == 0 and msg.role == "assistant":
            raise PromptError("the first message must have role 'user' or 'system'")
        content = message_content(msg, omni_input)
        audio_messages += [i] * sum(isinstance(c, AudioRef) for c in content)
        rendered.append((msg.role, content))
    use_tts_template = use_tts_template or bool(audio_messages)
    template = DEFAULT_TTS_CHAT_TEMPLATE if use_tts_template else None
    content = render_template(tokenizer, rendered, template, add_generation_prompt=True)
    return tokenize_prompt(content, tokenizer, audio_messages, settings)


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


def with_instructions(system: Message, instructions: str) -> Message:
    """A mode's system message with the caller's own instructions after it, on a new line, as typed text."""
    return Message(system.role, [*system.content, "\n", PlainText(instructions)])


# --- streaming (live) sessions -----------------------------------------------------------------------------------

After = Literal["system", "answer", "interrupt"]


_CLOSE = {"system": "", "answer": "<|im_end|>\n", "interrupt": "<|tts_eos|><|im_end|>\n"}
_OPEN = "<|im_start|>user\n"


def turn_markup(after: After | None) -> tuple[str, str]:
    """(close, open) markup before the first user chunk of a turn: what closes the previous message (nothing
    after the system message; after a finished answer `<|im_end|>\n`; after an interrupted one `<|tts_eos|>`
    first, which ends the cut speech) and what opens the user turn; ("", "") for later chunks of a turn."""
    if after is None:
        return "", ""
    if after not in _CLOSE:
        raise PromptError(f"unknown turn boundary {after!r}")
    return _CLOSE[after], _OPEN


def user_turn_prefix(after: After | None) -> str:
    return "".join(turn_markup(after))


@dataclass
class StreamingPromptState:
    """Upstream's per-session prompt flags (`is_first`, `new_user_msg`, `llm_generated`,
    `llm_generate_completed`), explicit and serialisable, so any replica can continue a session."""

    started: bool = False
    new_user_msg: bool = True
    generated: bool = False
    completed: bool = False

    def next_prefix(self, role: Role) -> tuple[bool, tuple[str, str]]:
        """(render with the TTS template as a new session?, (close, open) turn markup) for the next prefilled
        message; updates the state."""
        if not self.started:
            self.started = True
            if role in ("system", "assistant"):
                self.new_user_msg = True
            return True, ("", "")
        markup = ("", "")
        if self.new_user_msg and role == "user":
            if not self.generated:
                markup = turn_markup("system")
            else:
                markup = turn_markup("answer" if self.completed else "interrupt")
            self.new_user_msg = False
        if role in ("system", "assistant"):
            self.new_user_msg = True
        return False, markup

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
    content = message_content(msg, omni_input)
    first, (close, open_) = state.next_prefix(msg.role)
    if first:
        content = render_template(tokenizer, [(msg.role, content)], DEFAULT_TTS_CHAT_TEMPLATE, False)
    prompt = tokenize_prompt([m for m in (close, open_) if m] + content, tokenizer, settings=settings)
    prompt.close_tokens, prompt.open_tokens = _markup_counts(prompt.input_ids, close, open_, tokenizer)
    return prompt


def _markup_counts(ids: list[int], close: str, open_: str, tokenizer: PreTrainedTokenizerFast) -> tuple[int, int]:
    """How many leading ids are the close and the open markup. The close markup always ends at a control token
    boundary; the open markup's trailing newline may merge with typed text that starts with whitespace, and then
    only its control token counts as open."""
    n_close = len(encode_segments([close], tokenizer)) if close else 0
    open_ids = encode_segments([open_], tokenizer) if open_ else []
    n_open = len(open_ids) if ids[n_close : n_close + len(open_ids)] == open_ids else min(1, len(open_ids))
    return n_close, n_open


def assistant_prefix(tokenizer: PreTrainedTokenizerFast) -> Prompt:
    """The answer prefix `streaming_generate` appends; its spk bound marks the speaker hidden state."""
    return tokenize_prompt([ASSISTANT_PREFIX], tokenizer)
