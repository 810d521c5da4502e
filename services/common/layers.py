"""nn building blocks that more than one stage's model uses (upstream shares them too)."""

from __future__ import annotations

import torch
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
