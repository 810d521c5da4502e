"""Prompt builder behaviours beyond the golden cases: templates, joins, image ids, bounds, errors, prefixes."""

from __future__ import annotations

import pytest

from services.gateway.prompts import (
    ASSISTANT_PREFIX,
    AUDIO_TAG,
    IMAGE_TAG,
    AudioRef,
    ImageRef,
    Message,
    PlaceholderSettings,
    PlainText,
    PromptError,
    StreamingPromptState,
    assistant_prefix,
    audio_bounds,
    build_chat_prompt,
    build_streaming_prefill,
    encode_segments,
    image_bounds,
    system_prompt,
    user_turn_prefix,
)
from services.gateway.tokenizer import SpecialTokens, load_tokenizer
from services.common.image_layout import ImageProcessorConfig, slice_layout


@pytest.fixture(scope="module")
def tokenizer(golden):
    return load_tokenizer(golden.checkpoint)


@pytest.fixture(scope="module")
def sp(tokenizer) -> SpecialTokens:
    return SpecialTokens.from_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def settings(golden) -> PlaceholderSettings:
    return PlaceholderSettings.chat(ImageProcessorConfig.from_model_dir(golden.checkpoint))


def test_text_chat_uses_the_tokenizer_template(tokenizer, settings):
    p = build_chat_prompt([Message("user", "hi")], tokenizer, settings)
    assert p.rendered == tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert p.image_bounds == p.audio_bounds == p.spk_bounds == []


def test_own_system_message_replaces_the_default_one(tokenizer, settings):
    p = build_chat_prompt([Message("system", "Be brief."), Message("user", "hi")], tokenizer, settings)
    assert p.rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "Qwen" not in p.rendered


def test_audio_forces_the_tts_template_and_marks_the_speaker(tokenizer, sp, settings):
    p = build_chat_prompt([Message("user", ["listen", AudioRef(16000)])], tokenizer, settings)
    assert p.rendered == (
        f"<|im_start|>user\nlisten\n{AUDIO_TAG}<|im_end|>\n<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>"
    )
    (s, e), = p.spk_bounds
    assert e == s + 1 and p.input_ids[s] == sp.spk
    assert [e - s for s, e in p.audio_bounds] == [25]


def test_omni_input_joins_without_newlines(tokenizer, settings):
    msg = Message("user", ["<unit>", ImageRef((448, 336)), AudioRef(16000)])
    omni = build_chat_prompt([msg], tokenizer, settings, omni_input=True)
    plain = build_chat_prompt([msg], tokenizer, settings)
    assert f"<unit>{IMAGE_TAG}{AUDIO_TAG}" in omni.rendered
    assert f"<unit>\n{IMAGE_TAG}\n{AUDIO_TAG}" in plain.rendered


def test_long_audio_is_chunked_per_second(tokenizer, settings):
    p = build_chat_prompt([Message("user", [AudioRef(41600)])], tokenizer, settings)
    assert [e - s for s, e in p.audio_bounds] == [25, 25, 15]


def test_images_get_ids_and_one_bound_per_slice(tokenizer, settings):
    images = [ImageRef((1344, 896)), ImageRef((320, 200))]
    p = build_chat_prompt([Message("user", [images[0], images[1], "compare"])], tokenizer, settings)
    assert "<image_id>0</image_id>" in p.text and "<image_id>1</image_id>" in p.text
    n = [slice_layout(im.size_wh, None, settings.image).n_slices for im in images]
    assert len(p.image_bounds) == sum(n)
    assert all(e - s == settings.image.query_num for s, e in p.image_bounds)
    assert p.images == images


def test_max_slice_nums_and_image_ids_follow_the_call(tokenizer, golden):
    cfg = ImageProcessorConfig.from_model_dir(golden.checkpoint)
    p = build_chat_prompt(
        [Message("user", [ImageRef((1344, 896))])], tokenizer, PlaceholderSettings.chat(cfg, 1, False)
    )
    assert len(p.image_bounds) == 1 and "<image_id>" not in p.text


def test_typed_media_tags_are_rejected(tokenizer, settings):
    with pytest.raises(PromptError, match="tags"):
        build_chat_prompt([Message("user", f"look {IMAGE_TAG}")], tokenizer, settings)


@pytest.mark.parametrize(
    "msgs", [[], [Message("robot", "x")], [Message("assistant", "x")], [Message("user", [3.5])]]
)
def test_bad_messages_are_rejected(tokenizer, settings, msgs):
    with pytest.raises(PromptError):
        build_chat_prompt(msgs, tokenizer, settings)


def test_unbalanced_markers_are_an_error(tokenizer, sp):
    ids = tokenizer.encode("<image><unk><unk>")
    with pytest.raises(PromptError, match="unbalanced"):
        image_bounds(ids, sp)
    assert audio_bounds(tokenizer.encode("<|audio_start|><unk><|audio_end|>"), sp) == [(1, 2)]


def test_voice_cloning_needs_a_reference_voice():
    with pytest.raises(PromptError, match="reference voice"):
        system_prompt("voice_cloning", "en")
    ref = AudioRef(16000)
    assert system_prompt("voice_cloning", "en", ref).parts()[-1] is ref


def test_unknown_mode_and_language_fall_back_like_upstream():
    assert system_prompt("whatever", "fr") == system_prompt("default", "zh")
    assert system_prompt("omni", "fr") == system_prompt("omni", "en")


def test_turn_prefixes():
    assert user_turn_prefix(None) == ""
    assert user_turn_prefix("system") == "<|im_start|>user\n"
    assert user_turn_prefix("answer") == "<|im_end|>\n<|im_start|>user\n"
    assert user_turn_prefix("interrupt") == "<|tts_eos|><|im_end|>\n<|im_start|>user\n"
    with pytest.raises(PromptError):
        user_turn_prefix("later")


def test_streaming_first_message_is_rendered_as_a_session_start(tokenizer, golden):
    settings = PlaceholderSettings.streaming(ImageProcessorConfig.from_model_dir(golden.checkpoint))
    state = StreamingPromptState()
    p = build_streaming_prefill(Message("user", ["sys"]), state, tokenizer, settings)
    assert p.rendered == "<|im_start|>user\nsys<|im_end|>\n"
    # a system/assistant message in the middle of a session opens a new user turn afterwards
    assert build_streaming_prefill(Message("assistant", ["x"]), state, tokenizer, settings).rendered == "x"
    assert build_streaming_prefill(Message("user", ["y"]), state, tokenizer, settings).rendered == "<|im_start|>user\ny"


def test_streaming_units_use_one_slice_and_no_image_ids(tokenizer, golden):
    settings = PlaceholderSettings.streaming(ImageProcessorConfig.from_model_dir(golden.checkpoint))
    state = StreamingPromptState(started=True)
    unit = Message("user", ["<unit>", ImageRef((1344, 896)), AudioRef(16000)])
    p = build_streaming_prefill(unit, state, tokenizer, settings)
    assert len(p.image_bounds) == 1 and "<image_id>" not in p.text and len(p.audio_bounds) == 1


def test_assistant_prefix(tokenizer, sp):
    p = assistant_prefix(tokenizer)
    assert p.text == ASSISTANT_PREFIX and p.input_ids[0] == sp.im_end and p.input_ids[-1] == sp.tts_bos
    assert p.input_ids[p.spk_bounds[0][0]] == sp.spk


def test_segments_tokenize_as_upstreams_whole_string_split_only_at_the_servers_control_tokens(tokenizer, sp):
    markup = ["<|im_start|>user\n", "<unit><unk><unk>", "</image> says"]
    ids = encode_segments([*markup, PlainText(" hello"), PlainText(" there"), "<|im_end|>\n"], tokenizer)
    # the text runs on across segments into one BPE call ("</image> says" + the typed text), as upstream's does
    assert ids == tokenizer.encode("".join(markup) + " hello there<|im_end|>\n", add_special_tokens=False)
    assert encode_segments([*markup, PlainText(" hello there"), "<|im_end|>\n"], tokenizer) == ids  # and again
    typed = encode_segments([*markup, PlainText(" hello<|im_end|>"), "<|im_end|>\n"], tokenizer)
    assert typed.count(sp.im_end) == 1  # a typed control string is plain text
