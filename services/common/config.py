"""Typed configuration of the whole model, read from the official `config.json`.

Keys the file omits take upstream's class defaults (configuration_minicpm.py, WhisperConfig, SiglipVisionConfig,
ConditionalChatTTSConfig); the official file sets only `llm_dim` in `tts_config`, so most TTS values come from here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a dataclass from a dict: known keys override defaults, the rest is kept in `extra`."""
    names = {f.name for f in fields(cls)} - {"extra"}
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names}
    return cls(**known, extra=extra)  # type: ignore[call-arg]


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2 backbone (`llm.`); the top level of config.json. Defaults are Qwen2Config's."""

    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    vocab_size: int = 151936
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    sliding_window: int = 4096
    use_sliding_window: bool = False
    max_window_layers: int = 28
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class VisionConfig:
    """NaViT SigLIP (`vpm.`)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 980
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class AudioConfig:
    """Whisper encoder (`apm.`); WhisperConfig defaults; decoder fields are unused and stay in `extra`."""

    d_model: int = 256
    encoder_layers: int = 4
    encoder_attention_heads: int = 4
    encoder_ffn_dim: int = 1536
    num_mel_bins: int = 80
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    scale_embedding: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class TTSConfig:
    """ConditionalChatTTS (`tts.`); upstream class defaults, official file sets only `llm_dim`."""

    llm_dim: int = 2560
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_hidden_layers: int = 20
    max_position_embeddings: int = 4096
    num_audio_tokens: int = 626
    num_text_tokens: int = 21178
    num_mel_bins: int = 100
    num_vq: int = 4
    use_speaker_embedding: bool = True
    use_llm_hidden_state: bool = False
    spk_emb_token_id: int = 21143
    num_spk_embs: int = 1
    audio_bos_token_id: int = 21132
    text_eos_token_id: int = 21133
    use_text: bool = True
    streaming: bool = True
    streaming_text_chunk_size: int = 10
    streaming_text_reserved_len: int = 300
    streaming_audio_chunk_size: int = 50
    attn_implementation: str = "sdpa"
    use_mlp: bool = True
    aug_loss_weight: bool = True
    do_sample: bool = True
    top_p: float = 0.7
    top_k: int = 20
    repetition_penalty: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class SliceConfig:
    """Image slicing (`slice_config`, MiniCPMVSliceConfig)."""

    max_slice_nums: int = 9
    patch_size: int = 14
    scale_resolution: int = 448
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class ModelConfig:
    """The whole MiniCPM-o 2.6 model (MiniCPMOConfig)."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    tts: TTSConfig = field(default_factory=TTSConfig)
    slice: SliceConfig = field(default_factory=SliceConfig)
    query_num: int = 64
    image_size: int = 448
    patch_size: int = 14
    drop_vision_last_layer: bool = True
    batch_vision_input: bool = True
    vision_batch_size: int = 16
    use_image_id: bool = True
    slice_mode: bool = True
    audio_pool_step: int = 2
    audio_chunk_length: float = 1.0
    chunk_input: bool = True
    stream_input: bool = False
    torch_dtype: str = "bfloat16"

    @property
    def resampler_heads(self) -> int:
        """Upstream: `embed_dim // 128`."""
        return self.llm.hidden_size // 128

    @property
    def vision_layers_used(self) -> int:
        n = self.vision.num_hidden_layers
        return n - 1 if self.drop_vision_last_layer else n

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        top = {f.name for f in fields(cls)} - {"llm", "vision", "audio", "tts", "slice"}
        return cls(
            llm=_from_dict(LLMConfig, data),
            vision=_from_dict(VisionConfig, data.get("vision_config", {})),
            audio=_from_dict(AudioConfig, data.get("audio_config", {})),
            tts=_from_dict(TTSConfig, data.get("tts_config", {})),
            slice=_from_dict(SliceConfig, data.get("slice_config", {})),
            **{k: v for k, v in data.items() if k in top},
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json in the model directory")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# The official openbmb/MiniCPM-o-2_6 config.json values (facts), for meta-device shape checks and benchmarks.
REAL_CONFIG_JSON: dict[str, Any] = {
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 151700, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06, "hidden_act": "silu", "sliding_window": 131072, "use_sliding_window": False,
    "max_window_layers": 28, "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
    "query_num": 64, "image_size": 448, "patch_size": 14, "drop_vision_last_layer": False,
    "batch_vision_input": True, "vision_batch_size": 16, "use_image_id": True, "slice_mode": True,
    "slice_config": {"max_slice_nums": 9, "model_type": "minicpmv"},
    "audio_pool_step": 2, "audio_chunk_length": 1.0, "chunk_input": True, "torch_dtype": "bfloat16",
    "vision_config": {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14},
    "audio_config": {"d_model": 1024, "encoder_layers": 24, "encoder_attention_heads": 16, "encoder_ffn_dim": 4096,
                     "decoder_layers": 24, "decoder_attention_heads": 16, "decoder_ffn_dim": 4096,
                     "num_mel_bins": 80, "max_source_positions": 1500, "model_type": "whisper"},
    "tts_config": {"model_type": "conditional_chattts", "llm_dim": 3584},
}


def real_config() -> ModelConfig:
    """The real model's config (what `from_model_dir` gives on the official checkpoint)."""
    return ModelConfig.from_dict(REAL_CONFIG_JSON)


def small_config() -> ModelConfig:
    """The "small" benchmark config, defined once: real layer counts, vocabularies and head dims, ~1/8 widths.

    Compute per token scales like the real model (same depth, same attention shapes per head), so relative
    results (batching gains, real-time factors between stages) carry over. Head counts are rounded so the real
    head dims (LLM 128, SigLIP 72, Whisper 64, TTS 64) are kept.
    """
    real = real_config()
    return real.replace(
        llm=dataclasses.replace(
            real.llm, hidden_size=512, intermediate_size=2368, num_attention_heads=4, num_key_value_heads=1
        ),
        vision=dataclasses.replace(real.vision, hidden_size=144, intermediate_size=538, num_attention_heads=2),
        audio=dataclasses.replace(real.audio, d_model=128, encoder_ffn_dim=512, encoder_attention_heads=2),
        tts=dataclasses.replace(
            real.tts, llm_dim=512, hidden_size=128, intermediate_size=384, num_attention_heads=2
        ),
        drop_vision_last_layer=False,
    )

