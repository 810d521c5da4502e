"""The one multinomial draw both samplers (LLM tokens, TTS codes) use: inverse CDF over a given uniform.

Drawing from a uniform the caller supplies (from each row's own generator) rather than `torch.multinomial` keeps a
row's draw independent of its batch mates, and on the device without a host sync.
"""

from __future__ import annotations

import torch


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """weights (..., V) >= 0, unnormalised; uniforms (...) in [0, 1) -> (...) int64: the first index whose
    cumulative weight exceeds u * total. A zero-weight entry is never picked (when u * total rounds up to the
    total, the pick falls back to the last positive entry)."""
    cdf = weights.cumsum(-1)
    pick = torch.searchsorted(cdf, uniforms[..., None] * cdf[..., -1:], right=True)
    positions = torch.arange(weights.shape[-1], device=weights.device)
    last_positive = torch.where(weights > 0, positions, 0).amax(-1, keepdim=True)
    return torch.minimum(pick, last_positive)[..., 0]
