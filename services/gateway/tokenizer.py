"""The LLM tokenizer, loaded from the checkpoint directory without remote code.

The official `tokenizer_config.json` names a remote class (`MiniCPMOTokenizerFast`), which only adds id
properties for the special tokens on top of the Qwen2 fast tokenizer. We build the fast tokenizer straight from
`tokenizer.json` with the special tokens and chat template of the config files, and expose the special ids in
`SpecialTokens`, looked up by their strings (never hard-coded ids).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast


class TokenizerError(ValueError):
    """A checkpoint directory whose tokenizer files are missing or inconsistent."""


def load_tokenizer(model_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    model_dir = Path(model_dir)
    tok_file = model_dir / "tokenizer.json"
    cfg_file = model_dir / "tokenizer_config.json"
    for f in (tok_file, cfg_file):
        if not f.is_file():
            raise TokenizerError(f"{f}: missing (the checkpoint directory must hold the fast tokenizer files)")
    cfg = json.loads(cfg_file.read_text())
    extra = cfg.get("additional_special_tokens") or []
    map_file = model_dir / "special_tokens_map.json"
    if not extra and map_file.is_file():
        extra = json.loads(map_file.read_text()).get("additional_special_tokens", [])
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tok_file),
        bos_token=_token_str(cfg.get("bos_token")),
        eos_token=_token_str(cfg.get("eos_token")),
        pad_token=_token_str(cfg.get("pad_token")),
        unk_token=_token_str(cfg.get("unk_token")),
        additional_special_tokens=[_token_str(t) for t in extra],
        chat_template=cfg.get("chat_template"),
        model_max_length=cfg.get("model_max_length", 131072),
        clean_up_tokenization_spaces=cfg.get("clean_up_tokenization_spaces", False),
    )
    SpecialTokens.from_tokenizer(tok)  # fail at load time, not at the first request, if a token is missing
    return tok


def _token_str(tok: str | dict | None) -> str | None:
    return tok["content"] if isinstance(tok, dict) else tok


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens the prompts and bounds use, from the tokenizer's own vocabulary."""

    unk: int
    endoftext: int
    im_start: int
    im_end: int
    image_start: int
    image_end: int
    slice_start: int
    slice_end: int
    image_id_start: int
    image_id_end: int
    unit: int
    audio_start: int
    audio_end: int
    spk_bos: int
    spk: int
    spk_eos: int
    tts_bos: int
    tts_eos: int

    STRINGS = {
        "unk": "<unk>",
        "endoftext": "<|endoftext|>",
        "im_start": "<|im_start|>",
        "im_end": "<|im_end|>",
        "image_start": "<image>",
        "image_end": "</image>",
        "slice_start": "<slice>",
        "slice_end": "</slice>",
        "image_id_start": "<image_id>",
        "image_id_end": "</image_id>",
        "unit": "<unit>",
        "audio_start": "<|audio_start|>",
        "audio_end": "<|audio_end|>",
        "spk_bos": "<|spk_bos|>",
        "spk": "<|spk|>",
        "spk_eos": "<|spk_eos|>",
        "tts_bos": "<|tts_bos|>",
        "tts_eos": "<|tts_eos|>",
    }

    @classmethod
    def from_tokenizer(cls, tok: PreTrainedTokenizerFast) -> "SpecialTokens":
        ids = {name: tok.convert_tokens_to_ids(s) for name, s in cls.STRINGS.items()}
        missing = [cls.STRINGS[n] for n, i in ids.items() if i is None or (i == tok.unk_token_id and n != "unk")]
        if missing:
            raise TokenizerError(f"tokenizer lacks special tokens {missing}")
        return cls(**ids)

    @property
    def stop_ids(self) -> tuple[int, int]:
        """Upstream's terminators: generation ends on `<|im_end|>` or `<|endoftext|>`."""
        return (self.im_end, self.endoftext)
