"""The vision tower of MiniCPM-o 2.6: NaViT SigLIP (`vpm.`) and the perceiver resampler (`resampler.`).

Forward passes and weight loading only. State-dict names are the official checkpoint's.

Input layout (upstream `get_vllm_embedding`): each slice's pixels are (3, patch, n_patches*patch), patches side by
side in one pixel row strip; a batch zero-pads the strips to the longest one. The patch convolution then sees a
(3, patch, L) image and returns one token per patch; `tgt_sizes` (rows, cols of patches per slice) restore the 2-D
geometry for the position embeddings and mark which tokens are padding.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoder

from services.common.checkpoint import CheckpointReader, load_module
from services.common.config import ModelConfig, VisionConfig

PREFIXES = ("vpm.", "resampler.")


# ---- NaViT SigLIP --------------------------------------------------------------------------------------------------


def patch_attention_mask(tgt_sizes: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, 1, num_patches) bool, True for each slice's real patches (its first rows*cols tokens)."""
    lengths = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).to(torch.long)
    return (torch.arange(num_patches, device=tgt_sizes.device)[None, :] < lengths[:, None]).unsqueeze(1)


@lru_cache(maxsize=1024)
def _slice_position_ids(rows: int, cols: int, num_patches_per_side: int) -> torch.Tensor:
    """Position ids of a rows x cols patch grid on the num_patches_per_side² table, row-major.

    Fractional patch coordinates are bucketised onto the table; the exact torch calls (float32 aranges, a step that
    is float32 1/n) are upstream's, since the ids must be equal, not close.
    """
    side = num_patches_per_side
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    step_h = (1 / torch.tensor(rows, dtype=torch.int32)).item()
    step_w = (1 / torch.tensor(cols, dtype=torch.int32)).item()
    bucket_h = torch.bucketize(torch.arange(0, 1 - 1e-6, step_h), boundaries, right=True)
    bucket_w = torch.bucketize(torch.arange(0, 1 - 1e-6, step_w), boundaries, right=True)
    return (bucket_h[:, None] * side + bucket_w).flatten()


def bucketed_position_ids(tgt_sizes: torch.Tensor, num_patches: int, num_patches_per_side: int) -> torch.Tensor:
    """(B, num_patches) int64 position ids; padding tokens get 0 (as upstream)."""
    ids = torch.zeros((tgt_sizes.shape[0], num_patches), dtype=torch.long)
    for i, (rows, cols) in enumerate(tgt_sizes.tolist()):
        ids[i, : rows * cols] = _slice_position_ids(rows, cols, num_patches_per_side)
    return ids


class NaViTSiglipEmbeddings(nn.Module):
    """Patch convolution + a learned num_patches_per_side² position table."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.num_patches_per_side = cfg.num_patches_per_side
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, padding="valid"
        )
        self.position_embedding = nn.Embedding(self.num_patches_per_side**2, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values)  # (B, D, 1, L)
        return patches.flatten(2).transpose(1, 2) + self.position_embedding(position_ids)


def siglip_layers_config(cfg: VisionConfig, num_layers: int, attn_implementation: str) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_channels=cfg.num_channels,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps,
        attention_dropout=cfg.attention_dropout,
        attn_implementation=attn_implementation,
    )


class NaViTSiglipVisionTransformer(nn.Module):
    """`vpm`: embeddings, transformers' SiglipEncoder (key-padding mask for padded slices), post layernorm."""

    def __init__(self, cfg: VisionConfig, num_layers: int, attn_implementation: str = "sdpa"):
        super().__init__()
        self.embeddings = NaViTSiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(siglip_layers_config(cfg, num_layers, attn_implementation))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, patch, L), tgt_sizes (B, 2) -> (B, L/patch, D) last hidden state."""
        num_patches = pixel_values.shape[-1] // self.embeddings.patch_size
        position_ids = bucketed_position_ids(tgt_sizes.cpu(), num_patches, self.embeddings.num_patches_per_side)
        hidden = self.embeddings(pixel_values, position_ids.to(pixel_values.device))
        valid = patch_attention_mask(tgt_sizes.to(pixel_values.device), num_patches)  # (B, 1, L)
        mask = None
        if not bool(valid.all()):
            # Additive key mask, broadcast over heads and queries; padded queries still attend to real patches.
            mask = torch.zeros(valid.shape, dtype=hidden.dtype, device=hidden.device)
            mask = mask.masked_fill(~valid, torch.finfo(hidden.dtype).min).unsqueeze(1)  # (B, 1, 1, L)
        hidden = self.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
        return self.post_layernorm(hidden)


# ---- resampler -----------------------------------------------------------------------------------------------------


def sincos_1d(length: int, dim: int) -> np.ndarray:
    """(length, dim) sin|cos table of positions 0..length-1, base 10000, in float32 numpy as upstream computes it."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", np.arange(length, dtype=np.float32), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=-1)


class Resampler(nn.Module):
    """64 learned queries cross-attend to a slice's patch features (+ 2-D sin-cos positions on the keys)."""

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int, min_table_size: int = 70):
        super().__init__()
        self.embed_dim = embed_dim
        self.query = nn.Parameter(torch.empty(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.empty(embed_dim, embed_dim))
        # Upstream's 2-D table (h, w, D) is concat(sincos_{D/2}(w), sincos_{D/2}(h)); we keep the 1-D factor, which
        # grows with the largest side seen, so any grid beyond 70x70 costs O(side * D) memory, not O(h * w * D).
        # A plain attribute, not a buffer: it is derived, and must not stay on the meta device after loading.
        self._table_1d: torch.Tensor | None = None
        self._min_table_size = min_table_size
        if self.query.device.type != "meta":
            nn.init.trunc_normal_(self.query, std=0.02)
            nn.init.normal_(self.proj, std=embed_dim**-0.5)

    def _table(self, side: int, device: torch.device) -> torch.Tensor:
        table = self._table_1d
        if table is None or table.shape[0] < side or table.device != device:
            size = max(side, self._min_table_size, table.shape[0] if table is not None else 0)
            table = torch.from_numpy(sincos_1d(size, self.embed_dim // 2)).to(device)
            self._table_1d = table
        return table

    def position_embedding(self, tgt_sizes: torch.Tensor, length: int, device: torch.device) -> torch.Tensor:
        """(B, length, D) float32 positions of each slice's patches, row-major; zeros on padding."""
        rows, cols = tgt_sizes[:, 0:1].to(device), tgt_sizes[:, 1:2].to(device)
        table = self._table(int(tgt_sizes.max()), device)
        k = torch.arange(length, device=device)[None, :]
        valid = k < rows * cols
        row_idx = torch.where(valid, k // cols, 0)
        col_idx = torch.where(valid, k % cols, 0)
        pos = torch.cat([table[col_idx], table[row_idx]], dim=-1)
        return pos * valid.unsqueeze(-1)

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """x (B, L, kv_dim) patch features, tgt_sizes (B, 2) -> (B, num_queries, embed_dim)."""
        batch, length = x.shape[:2]
        pos = self.position_embedding(tgt_sizes, length, x.device).to(x.dtype)
        padding = ~patch_attention_mask(tgt_sizes.to(x.device), length).squeeze(1)  # True = ignore
        kv = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query).unsqueeze(0).expand(batch, -1, -1)
        out = self.attn(q, kv + pos, kv, key_padding_mask=padding, need_weights=False)[0]
        return self.ln_post(out) @ self.proj


# ---- the two together, with the official names ---------------------------------------------------------------------


class VisionModel(nn.Module):
    """`vpm` + `resampler`: slices in, `query_num` LLM-width embeddings per slice out."""

    def __init__(self, cfg: ModelConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.vpm = NaViTSiglipVisionTransformer(cfg.vision, cfg.vision_layers_used, attn_implementation)
        self.resampler = Resampler(
            cfg.query_num, cfg.llm.hidden_size, cfg.resampler_heads, cfg.vision.hidden_size
        )

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        return self.resampler(self.vpm(pixel_values, tgt_sizes), tgt_sizes)


def build_vision_model(
    cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> VisionModel:
    """Randomly initialised model (benchmarks, tests); use `load_vision_model` for real weights."""
    with torch.device(device):
        return VisionModel(cfg, attn_implementation).to(dtype).eval()


def load_vision_model(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa", progress: bool = False,
) -> VisionModel:
    """Build on the meta device and load `vpm.` + `resampler.` from the checkpoint shards (nothing else)."""
    cfg = ModelConfig.from_model_dir(model_dir)
    with torch.device("meta"):
        model = VisionModel(cfg, attn_implementation)
    load_module(model, CheckpointReader(model_dir), PREFIXES, dtype=dtype, device=device, progress=progress)
    return model.eval()
