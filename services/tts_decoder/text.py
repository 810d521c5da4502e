"""ChatTTS text side: tokenizer, upstream's text normalisation, and the 303-slot condition layout.

Layout of the TTS condition (upstream `prepare_tts_text`):
`[Stts] [spk_emb]*num_spk [text tokens] [Etts] [PAD]... [Ptts]`, the text + [Etts] + [PAD]s filling the
`streaming_text_reserved_len` (300) reserved slots.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BertTokenizerFast

from services.common.config import TTSConfig
from services.runtime.errors import InvalidArgument

TOKENIZER_SUBDIR = "assets/chattts_tokenizer"
STTS, ETTS, PTTS, PAD, SPK_EMB = "[Stts]", "[Etts]", "[Ptts]", "[PAD]", "[spk_emb]"
SENTENCE_ENDS = (".", "。", "!", "?", "！", "？")
CLAUSE_ENDS = (",", "，", "、", ";", "；", ":", "：")
_DIGITS_EN = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGITS_ZH = "零一二三四五六七八九"


class TTSInputError(InvalidArgument):
    """Input the speech decoder cannot synthesise; the message says what to change."""


class EmptyTextError(TTSInputError):
    pass


class TextTooLongError(TTSInputError):
    pass


def detect_language(text: str) -> str:
    """Upstream `NumberToTextConverter.detect_language`: more CJK ideographs than Latin letters -> chinese."""
    chinese = len(re.findall(r"[\u4e00-\u9fff]", text))
    english = len(re.findall(r"[a-zA-Z]", text))
    return "chinese" if chinese >= english else "english"


def numbers_to_words(text: str, language: str) -> str:
    """Upstream `replace_numbers_with_text`: every digit run is read digit by digit."""

    def spell(match: re.Match[str]) -> str:
        digits = [int(c) for c in match.group(0) if c in "0123456789"]
        if language == "chinese":
            return "".join(_DIGITS_ZH[d] for d in digits)
        return " ".join(_DIGITS_EN[d] for d in digits)

    return re.sub(r"\d+", spell, text)


def normalize(text: str, language: str) -> str:
    """What upstream applies to every streamed text piece: digits to words, markdown `*` removed."""
    return numbers_to_words(text, language).replace("*", "")


def sentence_end(piece: str) -> str:
    """Upstream `sentence_end`: the first sentence-end mark found in `piece` ("" if none).

    A "." right after a digit (as in "1.") is not a sentence end; the other marks are checked after it.
    """
    for mark in SENTENCE_ENDS:
        idx = piece.find(mark)
        if idx < 0:
            continue
        if mark == "." and idx > 0 and piece[idx - 1].isdigit():
            continue
        return mark
    return ""


@dataclass(frozen=True)
class TTSLayout:
    ids: list[int]  # condition_length ids: [Stts] [spk_emb].. text [Etts] [PAD].. [Ptts]
    n_text: int  # number of text tokens (upstream `tts_token_lens`)


class ChatTTSText:
    """The ChatTTS BERT tokenizer (from the checkpoint's assets; never the network) and the layout rules."""

    def __init__(self, model_dir: str | Path, cfg: TTSConfig):
        path = Path(model_dir) / TOKENIZER_SUBDIR
        if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
            raise FileNotFoundError(f"{path}: ChatTTS tokenizer not found (expected tokenizer.json or vocab.txt)")
        self.tokenizer = BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
        self.cfg = cfg
        self.reserved = cfg.streaming_text_reserved_len
        self.n_start = 1 + cfg.num_spk_embs * int(cfg.use_speaker_embedding)  # [Stts] + [spk_emb]s
        self.condition_length = self.n_start + self.reserved + 1  # + [Ptts]
        # The last reserved slot must stay free for [Etts], so a segment holds at most reserved-1 text tokens.
        self.max_text_tokens = self.reserved - 1

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def cut(self, text: str, limit: int, least: int, after: int = 0) -> int:
        """Where to end a segment of `text` (over `limit` tokens) so that it keeps at most `limit` tokens and, at a
        boundary, at least `least`: after its last sentence end, else clause mark, else space in that window, else
        at the limit. The cut comes after character `after` (a rolled-over segment's seed, so that every segment
        takes new text)."""
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        hard = offsets[limit][0]
        lowest = max(after, offsets[least][0] - 1)
        for marks in (SENTENCE_ENDS, CLAUSE_ENDS, (" ", "\n")):
            at = max(text.rfind(m, lowest, hard) for m in marks)
            if at > after:
                return at + 1
        while self.count(text[:hard]) > limit:  # re-tokenised, a prefix cut inside a word may count more
            limit -= 1
            hard = offsets[limit][0]
        return hard

    def layout(self, text: str) -> TTSLayout:
        """Upstream `prepare_tts_text` tokenized: the string is built with the special tokens and encoded whole."""
        n_text = self.count(text)
        if n_text > self.max_text_tokens:
            raise TextTooLongError(
                f"text has {n_text} TTS tokens; at most {self.max_text_tokens} fit the {self.reserved} reserved slots "
                "of one segment (streaming input is split into segments; offline synthesis takes one)")
        pad = ETTS + PAD * (self.reserved - n_text - 1)
        string = f"{STTS}{SPK_EMB * (self.n_start - 1)}{text}{pad}{PTTS}"
        ids = self.encode(string)
        if len(ids) != self.condition_length:
            raise TTSInputError(f"text {text!r} does not tokenize to a {self.condition_length}-slot layout")
        return TTSLayout(ids=ids, n_text=n_text)

    def start_ids(self) -> list[int]:
        """`[Stts][spk_emb]..`: the fixed head of every segment."""
        return self.encode(STTS + SPK_EMB * (self.n_start - 1))

    def text_mask(self, n_text: int) -> torch.Tensor:
        """Upstream `_build_streaming_mask`: which condition slots hold [Stts], speaker, text, [Etts] (and the last)."""
        mask = torch.zeros(self.condition_length, dtype=torch.int64)
        mask[: self.n_start + n_text + 1] = 1
        mask[-1] = 1
        return mask
