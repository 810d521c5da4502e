"""ModelConfig: values come from config.json, omitted keys take upstream's class defaults."""

from __future__ import annotations

import dataclasses
import json

import pytest

from services.common.config import (
    AudioConfig,
    LLMConfig,
    ModelConfig,
    SliceConfig,
    TTSConfig,
    VisionConfig,
    real_config,
    small_config,
)

SECTIONS = {"vision_config": ("vision", VisionConfig), "audio_config": ("audio", AudioConfig),
            "tts_config": ("tts", TTSConfig), "slice_config": ("slice", SliceConfig)}


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"extra"}


def test_golden_config_values(golden):
    """Every key of the golden config.json that the typed config models is read as written."""
    raw = json.loads((golden.checkpoint / "config.json").read_text())
    cfg = ModelConfig.from_model_dir(golden.checkpoint)
    for key in _field_names(LLMConfig) & raw.keys():
        assert getattr(cfg.llm, key) == raw[key], key
    for key in _field_names(ModelConfig) & raw.keys():
        assert getattr(cfg, key) == raw[key], key
    for section, (attr, cls) in SECTIONS.items():
        for key in _field_names(cls) & raw[section].keys():
            assert getattr(getattr(cfg, attr), key) == raw[section][key], f"{section}.{key}"
        # keys the typed config does not model are kept, not dropped
        assert set(getattr(cfg, attr).extra) == raw[section].keys() - _field_names(cls)


def test_omitted_keys_take_class_defaults(golden):
    raw = json.loads((golden.checkpoint / "config.json").read_text())
    cfg = ModelConfig.from_model_dir(golden.checkpoint)
    for section, (attr, cls) in SECTIONS.items():
        omitted = _field_names(cls) - raw[section].keys()
        defaults = cls()
        for key in omitted:
            assert getattr(getattr(cfg, attr), key) == getattr(defaults, key), f"{section}.{key}"
    assert cfg.stream_input is ModelConfig().stream_input  # class-only default, never in config.json


def test_real_config_is_the_official_model():
    """Facts of openbmb/MiniCPM-o-2_6 (MODEL.md section 1); tts_config there sets only llm_dim."""
    cfg = real_config()
    assert (cfg.llm.hidden_size, cfg.llm.num_hidden_layers, cfg.llm.num_key_value_heads, cfg.llm.vocab_size) == (
        3584, 28, 4, 151700)
    assert cfg.llm.head_dim == 128 and cfg.resampler_heads == 28
    assert (cfg.vision.hidden_size, cfg.vision_layers_used, cfg.vision.num_patches_per_side) == (1152, 27, 70)
    assert (cfg.audio.d_model, cfg.audio.encoder_layers, cfg.audio.encoder_ffn_dim) == (1024, 24, 4096)
    assert cfg.tts.llm_dim == 3584
    # everything else in tts_config is ConditionalChatTTSConfig's class default
    assert (cfg.tts.hidden_size, cfg.tts.num_hidden_layers, cfg.tts.num_text_tokens, cfg.tts.num_audio_tokens) == (
        768, 20, 21178, 626)
    assert (cfg.tts.audio_bos_token_id, cfg.tts.text_eos_token_id, cfg.tts.spk_emb_token_id) == (21132, 21133, 21143)
    assert (cfg.tts.streaming_text_chunk_size, cfg.tts.streaming_text_reserved_len) == (10, 300)
    assert cfg.drop_vision_last_layer is False and ModelConfig().drop_vision_last_layer is True


def test_small_config_keeps_depth_vocab_and_head_dims():
    real, small = real_config(), small_config()
    assert small.llm.num_hidden_layers == real.llm.num_hidden_layers
    assert small.llm.vocab_size == real.llm.vocab_size and small.tts.num_text_tokens == real.tts.num_text_tokens
    assert small.llm.head_dim == real.llm.head_dim
    assert small.vision.hidden_size // small.vision.num_attention_heads == (
        real.vision.hidden_size // real.vision.num_attention_heads)
    assert small.audio.d_model // small.audio.encoder_attention_heads == (
        real.audio.d_model // real.audio.encoder_attention_heads)
    assert small.tts.hidden_size // small.tts.num_attention_heads == (
        real.tts.hidden_size // real.tts.num_attention_heads)
    assert small.tts.llm_dim == small.llm.hidden_size  # the TTS projector reads LLM hidden states
    assert small.llm.hidden_size < real.llm.hidden_size and small.llm.hidden_size % 128 == 0


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
        ModelConfig.from_model_dir(tmp_path)


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_model_dir(tmp_path)
