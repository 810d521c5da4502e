"""Incremental detokenization: held-back partial UTF-8, kept "!", dropped stop ids, pieces add up."""

from __future__ import annotations

import random

import pytest

from services.gateway.tokenizer import SpecialTokens, load_tokenizer
from services.gateway.detokenize import REPLACEMENT_CHAR, IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(golden):
    return load_tokenizer(golden.checkpoint)


def test_multibyte_character_is_held_back_until_complete(tokenizer):
    ids = tokenizer.encode("a😀b")
    d = IncrementalDetokenizer(tokenizer)
    pieces = [d.push([i]) for i in ids]
    assert "".join(pieces) + d.finish() == "a😀b"
    assert REPLACEMENT_CHAR not in "".join(pieces)
    assert "😀" in pieces  # emitted in one piece, once its last byte arrived


def test_unfinished_character_is_flushed_at_the_end(tokenizer):
    ids = tokenizer.encode("😀")
    d = IncrementalDetokenizer(tokenizer)
    assert d.push(ids[:-1]) == ""
    assert d.finish() == REPLACEMENT_CHAR * len(tokenizer.decode(ids[:-1]))


def test_exclamation_mark_is_kept(tokenizer):
    """Unlike upstream's `_decode_text`, the token that decodes to "!" is not dropped."""
    d = IncrementalDetokenizer(tokenizer)
    assert d.push(tokenizer.encode("Hello!")) == "Hello!"


def test_stop_ids_are_dropped(tokenizer):
    sp = SpecialTokens.from_tokenizer(tokenizer)
    d = IncrementalDetokenizer(tokenizer, drop_ids=sp.stop_ids)
    assert d.push(tokenizer.encode("ok") + [sp.im_end]) == "ok"


def test_pieces_add_up_to_the_full_decode(tokenizer):
    rng = random.Random(0)
    specials = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in specials]
    for _ in range(20):
        ids = [rng.choice(vocab) for _ in range(rng.randint(1, 30))]
        d = IncrementalDetokenizer(tokenizer)
        out = "".join(d.push(ids[k : k + 3]) for k in range(0, len(ids), 3)) + d.finish()
        assert out == tokenizer.decode(ids) == d.text
