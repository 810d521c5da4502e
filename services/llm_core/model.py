"""The Qwen2 backbone (`llm.`) of MiniCPM-o 2.6: embedding splice, forward, weight loading.

Forward passes and weight loading only (like a vLLM model file). Batching of many sessions, KV pooling and
scheduling live in `services.llm_core.engine`; the `DynamicCache` helpers here serve solo runs and parity tests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import Cache, DynamicCache
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from services.common.checkpoint import CheckpointReader, load_module
from services.common.config import LLMConfig, ModelConfig

LLM_PREFIX = "llm."

# One embedding piece to write into the token embeddings: rows [start, end) get `embeds` (end - start, D).
Piece = tuple[int, int, torch.Tensor]


class SpliceError(ValueError):
    """Encoder outputs that do not fit the placeholder bounds of the prompt."""


def sequential_pieces(bounds: Sequence[tuple[int, int]], embeds: torch.Tensor) -> list[Piece]:
    """Cut `embeds` (N, D) into consecutive rows for `bounds`, in order, as upstream fills them.

    Images: all slices of all images, each slice's query rows in turn; audio (chunked input): every audio's
    tokens concatenated, filling the 1 s chunk bounds one after another.
    """
    need = sum(e - s for s, e in bounds)
    if embeds.shape[0] != need:
        raise SpliceError(f"{embeds.shape[0]} embedding rows for placeholders of {need} tokens in total")
    pieces, row = [], 0
    for s, e in bounds:
        pieces.append((s, e, embeds[row : row + e - s]))
        row += e - s
    return pieces


def qwen2_config(cfg: LLMConfig) -> Qwen2Config:
    """The transformers config of the backbone, with SDPA attention (what upstream runs)."""
    qcfg = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        use_sliding_window=cfg.use_sliding_window,
        sliding_window=cfg.sliding_window,
        max_window_layers=cfg.max_window_layers,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_dropout=cfg.attention_dropout,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )
    qcfg._attn_implementation = "sdpa"
    return qcfg


@dataclass
class LLMOutput:
    logits: torch.Tensor  # (B, T, V) float32
    hidden: torch.Tensor  # (B, T, D) last layer, after the final norm (upstream's `hidden_states[-1]`)
    cache: Cache | None


class LLMModel(nn.Module):
    """Holds `llm` (transformers Qwen2ForCausalLM, SDPA), so state-dict keys are the checkpoint's `llm.*`."""

    def __init__(self, cfg: LLMConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        self.config = qwen2_config(cfg)
        # Built on the meta device: weights come from the checkpoint (assigned), so random init would be wasted
        # work (minutes and 30 GB at the real size).
        with torch.device("meta"):
            self.llm = Qwen2ForCausalLM(self.config)
        self.llm.eval()
        self.device_ = torch.device(device)
        self.dtype = dtype

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def layers(self) -> nn.ModuleList:
        return self.llm.model.layers

    def materialize_buffers(self) -> None:
        """Rebuild the non-persistent RoPE buffers (not in the checkpoint) on the target device."""
        with torch.device(self.device_):
            self.llm.model.rotary_emb = Qwen2RotaryEmbedding(self.config)

    # --- embedding splice -------------------------------------------------------------------------------------

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm.model.embed_tokens(input_ids.to(self.device_))

    def embed(self, input_ids: torch.Tensor, pieces: Sequence[Piece] = ()) -> torch.Tensor:
        """Token embeddings (T, D) of `input_ids` (T,) with encoder outputs written at their bounds.

        Upstream (`get_vllm_embedding` / `get_omni_embedding`) overwrites the placeholder rows in place; the
        placeholder token embeddings themselves never reach the LLM.
        """
        if input_ids.dim() != 1:
            raise SpliceError(f"input_ids must be 1-D (T,), got shape {tuple(input_ids.shape)}")
        out = self.embed_tokens(input_ids).clone()
        T = out.shape[0]
        for start, end, rows in pieces:
            if not 0 <= start <= end <= T:
                raise SpliceError(f"bound ({start}, {end}) outside the prompt of {T} tokens")
            if tuple(rows.shape) != (end - start, self.hidden_size):
                raise SpliceError(
                    f"embeddings of shape {tuple(rows.shape)} do not fit bound ({start}, {end}) "
                    f"(needs ({end - start}, {self.hidden_size}))"
                )
            out[start:end] = rows.to(device=out.device, dtype=out.dtype)
        return out

    # --- forward ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        inputs_embeds: torch.Tensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> LLMOutput:
        """One batched forward over `inputs_embeds` (B, T, D).

        `attention_mask` (B, past + T) marks real tokens (1) vs padding (0); `position_ids` (B, T) default to
        past length + arange. `logits_to_keep=k` computes logits for the last k positions only (0 = all).
        """
        out = self.llm.model(
            inputs_embeds=inputs_embeds.to(device=self.device_, dtype=self.dtype),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
        )
        hidden = out.last_hidden_state
        logits = self.llm.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden).float()
        return LLMOutput(logits=logits, hidden=hidden, cache=cache)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def step(self, inputs_embeds: torch.Tensor, cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Solo prefill/decode: append `inputs_embeds` (T, D) to `cache`; returns logits (T, V), hidden (T, D)."""
        out = self.forward(inputs_embeds.unsqueeze(0), cache=cache)
        return out.logits[0], out.hidden[0]


def build_llm_model(
    cfg: ModelConfig | LLMConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LLMModel:
    """An LLMModel with meta-device weights (for shape checks, or to be loaded)."""
    return LLMModel(cfg.llm if isinstance(cfg, ModelConfig) else cfg, device=device, dtype=dtype)


def random_llm_model(
    cfg: ModelConfig | LLMConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LLMModel:
    """An LLMModel with random weights (benchmarks of configs that have no checkpoint, e.g. `small_config()`).

    Scales keep activations O(1) through the depth: linear weights N(0, 1/fan_in), embeddings N(0, 1), norms 1.
    """
    model = build_llm_model(cfg, device=device, dtype=dtype)
    model.llm.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=gen)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
    model.llm.to(dtype=dtype)
    model.materialize_buffers()
    return model


def load_llm_model(
    model_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> LLMModel:
    """Build the backbone from `config.json` and load the `llm.` tensors straight from the shards."""
    model = build_llm_model(ModelConfig.from_model_dir(model_dir), device=device, dtype=dtype)
    load_module(model, CheckpointReader(model_dir), [LLM_PREFIX], dtype=dtype, device=device, progress=progress)
    model.materialize_buffers()
    return model
