"""Attention over the KV arena: each query row reads its own session's keys where they live, never a copy.

`ArenaAttention` (CPU, and eager steps on CUDA):
- decode rows (one query over all of its session's keys, no mask): on CPU (float32) all of a layer's decode rows
  go to one call of our C++ kernel (`cpu_attention`), which reads each session's keys and values once, in place;
  at 4096 tokens of context x 16 sessions it took ~70 ms a step where a torch call per session took ~185 ms (small
  config, 1 thread; a plain read of those bytes: ~52 ms). Elsewhere (CUDA eager steps, other dtypes, or where the
  kernel could not be built) each decode row runs `sequence_attention` over a view of its session's run;
- prefill chunks: one SDPA call per sequence over a view of its run, is_causal (a new session) or a float
  additive mask (a chunk after earlier rows).
One batched torch call for every row would need every session's keys gathered into one padded tensor per layer
per step: the copy, proportional to context, that this backend exists to avoid.

The decode path of CUDA replicas (flex attention over the same arena, captured in CUDA graphs) is
`cuda_graphs.FlexDecodeAttention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.llm_core.engine import cpu_attention
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
        self.kernel = cpu_attention.usable(arena.k)
        self.spans: list[SeqSpan] = []  # the sequences attended one by one
        self.masks: list[torch.Tensor | None] = []
        self.rows = torch.empty(0, dtype=torch.long)
        # the kernel's decode rows, if any: (their batch rows, their sessions' arena offsets, their key counts)
        self.decodes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def prepare(self, spans: list[SeqSpan]) -> None:
        """Set up for a batch whose rows are `spans`, in row order (masks are built once, not per layer)."""
        device, dtype = self.arena.k.device, self.arena.k.dtype
        rows = [s.offset + s.start + i for s in spans for i in range(s.n)]
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        decodes = [s for s in spans if s.n == 1] if self.kernel else []
        self.spans = [s for s in spans if s.n > 1] if self.kernel else spans
        self.masks = [causal_mask(s.n, s.start + s.n, dtype, device) if s.n > 1 and s.start else None
                      for s in self.spans]  # fmt: skip
        self.decodes = None
        if decodes:
            self.decodes = (
                torch.tensor([s.row for s in decodes], dtype=torch.long),
                torch.tensor([s.offset for s in decodes], dtype=torch.long),
                torch.tensor([s.start + 1 for s in decodes], dtype=torch.long),
            )

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.arena.write(layer, self.rows, k, v)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        if self.decodes is not None:
            rows, offsets, lengths = self.decodes
            k, v = self.arena.k[layer], self.arena.v[layer]
            out[rows] = cpu_attention.decode_attention(q[rows], k, v, offsets, lengths)
        for s, mask in zip(self.spans, self.masks):
            k, v = self.arena.keys(layer, s.offset, s.start + s.n)
            out[s.row : s.row + s.n] = sequence_attention(q[s.row : s.row + s.n], k, v, mask)
        return out
