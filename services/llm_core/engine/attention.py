"""Attention over the KV arena: each query row reads its own session's keys where they live, never a copy.

`ArenaAttention` (CPU, and eager steps on CUDA) runs one SDPA call per sequence of the batch over a view of the
session's run (`services.llm_core.model.sequence_attention`): a decode row is one query over all of its session's
keys, so it needs no mask; a prefill chunk uses is_causal (a new session) or a float additive mask (a chunk after
earlier rows). A per-sequence call costs ~15 us of overhead, 16 sessions x 28 layers ~7 ms of a ~180 ms step (small
config, 1 thread), while one batched call would need every session's keys gathered into one padded tensor per
layer per step: the copy, proportional to context, that this backend exists to avoid.

The decode path of CUDA replicas (flex attention over the same arena, captured in CUDA graphs) is
`cuda_graphs.FlexDecodeAttention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.llm_core.engine.kv_cache import KVArena
from services.llm_core.model import causal_mask, sequence_attention


@dataclass(frozen=True)
class SeqSpan:
    """The rows of one session in a packed batch."""

    row: int  # first row in the batch
    n: int  # rows
    offset: int  # arena row of the session's KV position 0
    start: int  # KV position of the first row: the session's rows [0, start) are in the arena already


class ArenaAttention:
    def __init__(self, arena: KVArena):
        self.arena = arena
        self.spans: list[SeqSpan] = []
        self.masks: list[torch.Tensor | None] = []
        self.rows = torch.empty(0, dtype=torch.long)

    def prepare(self, spans: list[SeqSpan]) -> None:
        """Set up for a batch whose rows are `spans`, in row order (masks are built once, not per layer)."""
        device, dtype = self.arena.k.device, self.arena.k.dtype
        self.spans = spans
        self.masks = [causal_mask(s.n, s.start + s.n, dtype, device) if s.n > 1 and s.start else None for s in spans]
        rows = [s.offset + s.start + i for s in spans for i in range(s.n)]
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.arena.write(layer, self.rows, k, v)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        for s, mask in zip(self.spans, self.masks):
            k, v = self.arena.keys(layer, s.offset, s.start + s.n)
            out[s.row : s.row + s.n] = sequence_attention(q[s.row : s.row + s.n], k, v, mask)
        return out
