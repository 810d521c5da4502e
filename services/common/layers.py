"""nn building blocks that more than one stage's model uses (upstream shares them too).

`rms_norm` and `Rotation` compute transformers' Llama/Qwen2 RMSNorm and rotary embedding in fewer kernels, with the
same arithmetic: a decode step of one row per sequence is bound by per-kernel overhead (the speech decoder's steps
on CPU; every small-batch step on a GPU), and each layer runs two norms and rotates queries and keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiModalProjector(nn.Module):
    """Upstream `MultiModalProjector`: linear1 -> ReLU -> linear2 (audio projector and the TTS speaker projector)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(in_dim, out_dim)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.relu(self.linear1(x)))


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What `norm` (a transformers `LlamaRMSNorm` or `Qwen2RMSNorm`) computes, with torch's fused normalisation in
    place of its five kernels: float32 math, rounded to x's dtype before the weight, as transformers does.
    Bit-identical on CPU (tests/unit/test_layers.py); on CUDA the fused mean may sum in another order."""
    return norm.weight * F.rms_norm(x.float(), x.shape[-1:], eps=norm.variance_epsilon).to(x.dtype)


class Rotation:
    """transformers' `apply_rotary_pos_emb` for the cos/sin of one forward, applied to any tensor whose dim 1 are
    heads (or that broadcasts so: the speech decoder rotates its queries and keys stacked, in one call).

    `x * cos + rotate_half(x) * sin` with rotate_half(x) = [-x2, x1] is computed as `x * cos + roll(x) * sin'` with
    roll(x) = [x2, x1] and sin' = [-sin1, sin2]: the same products and sums, bit for bit, in 4 kernels instead of
    6, and sin' is made once per forward rather than once per layer."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        """cos, sin: (B, ..., head_dim) as the rotary embedding returns them; dim 1 is inserted for the heads."""
        self.half = sin.shape[-1] // 2
        self.cos = cos[:, None]
        self.sin = torch.cat((-sin[..., : self.half], sin[..., self.half :]), -1)[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cos + x.roll(self.half, -1) * self.sin
