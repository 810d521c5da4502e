"""ChatTTS text rules: number normalisation, `*` stripping, sentence ends, layout and its limits."""

from __future__ import annotations

import pytest

from services.common.config import ModelConfig
from services.tts_decoder.text import (
    ChatTTSText,
    TextTooLongError,
    detect_language,
    normalize,
    numbers_to_words,
    sentence_end,
)


@pytest.fixture(scope="module")
def text(golden):
    return ChatTTSText(golden.checkpoint, ModelConfig.from_model_dir(golden.checkpoint).tts)


def test_numbers_read_digit_by_digit():
    assert numbers_to_words("I have 23 books and 0 pens", "english") == "I have two three books and zero pens"
    assert numbers_to_words("我有2个苹果, 10个梨", "chinese") == "我有二个苹果, 一零个梨"


def test_normalize_strips_markdown_stars():
    assert normalize("**bold** 7", "english") == "bold seven"


def test_detect_language():
    assert detect_language("hello 你") == "english"
    assert detect_language("你好 ab") == "chinese"
    assert detect_language("123") == "chinese"  # ties (0 vs 0) read as chinese, as upstream


def test_sentence_end():
    assert sentence_end("done. next") == "."
    assert sentence_end("item 1. next") == ""  # a "." after a digit is a list number, not an end
    assert sentence_end("好。") == "。"
    assert sentence_end("really?") == "?"
    assert sentence_end("no end") == ""


def test_layout_pads_to_condition_length(text):
    layout = text.layout("hello world.")
    assert len(layout.ids) == text.condition_length
    assert layout.n_text == text.count("hello world.")
    tok = text.tokenizer
    assert layout.ids[0] == tok.convert_tokens_to_ids("[Stts]")
    assert layout.ids[1] == tok.convert_tokens_to_ids("[spk_emb]")
    assert layout.ids[text.n_start + layout.n_text] == tok.convert_tokens_to_ids("[Etts]")
    assert layout.ids[-1] == tok.convert_tokens_to_ids("[Ptts]")
    mask = text.text_mask(layout.n_text)
    assert mask.sum().item() == text.n_start + layout.n_text + 2


def test_layout_rejects_text_over_the_reserved_slots(text):
    with pytest.raises(TextTooLongError, match="reserved"):
        text.layout("word " * (text.reserved + 5))


def test_cut_keeps_a_segment_within_the_limit_at_the_best_boundary(text):
    """Over-long segment text ends after its last sentence end in the window of `least`..`limit` tokens, else
    its last clause mark, else its last space; with no boundary there it is cut at exactly the limit."""
    limit, least, filler = 30, 10, "word " * 40
    head = "one two three four five six seven eight nine ten eleven"
    for string, segment in (
        (f"{head}. twelve, thirteen " + filler, f"{head}."),
        (f"{head}, twelve thirteen " + filler, f"{head},"),
        ("one. two, three " + filler, None),  # marks before the window do not count: the last space wins
    ):
        cut = text.cut(string, limit, least)
        assert text.count(string[:cut]) <= limit
        if segment is None:
            assert string[:cut].endswith("word ") and text.count(string[: cut + 5]) > limit
        else:
            assert string[:cut] == segment
    unbroken = "said " + "你好" * 40  # a space, but before the window, then one token per character
    assert text.count(unbroken[: text.cut(unbroken, limit, least)]) == limit
