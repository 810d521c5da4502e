"""CUDA decode steps: flex attention over the KV arena, captured in CUDA graphs per batch-size bucket.

On CUDA the decode rows of a step replay the graph of the smallest bucket (1, 2, 4, ..., 64) that holds them;
the step's prefill chunks run eagerly as a second forward (`runner.ModelRunner`, `attention.ArenaAttention`). Why flex attention: it ships with PyTorch (no
extra package; flash-attn is not installed here), compiles to one fused Triton kernel, and reads the arena in
place through a block mask whose block list and row bounds live in static tensors, so one captured graph serves
any sessions at any lengths. Each decode row is its own batch entry of the flex call, the arena one KV entry
broadcast over them (as flex allows when the block mask has the queries' batch): the row lists only its own session's kernel blocks (arena runs are aligned to `KERNEL_BLOCK`, so a listed
block never holds another session's rows) and its mask_mod keeps keys [session start, own position].

Padding rows of a bucket: zero embeddings at position 0, K/V written to the arena's scratch block, no blocks
listed. Nothing they compute reaches a real row: rows mix only inside attention, and no real row lists the
scratch block.

Not run on this project's CPU-only machines: the bookkeeping (buckets, block tables) is tested on CPU, and so is
the decoder with `capture=False` (the same bucketed forward, eager, through PyTorch's unfused reference
implementation of flex, which unlike the fused kernel reads every key position). Graph capture, the compiled
kernel and their speed need a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from services.llm_core.engine.attention import SeqSpan
from services.llm_core.engine.kv_cache import KVArena
from services.llm_core.model import LLMModel

KERNEL_BLOCK = 128  # flex attention's KV block: the arena's block size must be a multiple of it on CUDA


def graph_buckets(max_rows: int) -> list[int]:
    """Batch sizes to capture: powers of two below `max_rows`, then `max_rows`."""
    sizes, b = [], 1
    while b < max_rows:
        sizes.append(b)
        b *= 2
    return [*sizes, max_rows]


def bucket_for(n: int, buckets: list[int]) -> int | None:
    return next((b for b in buckets if b >= n), None)


class DecodeTable:
    """Per-row metadata of up to `max_rows` decode rows in static tensors (the inputs of the captured graphs): the
    arena row each row writes, the arena rows it may read [kv_start, kv_end), and its kernel blocks."""

    def __init__(self, max_rows: int, arena: KVArena):
        dev = arena.k.device
        total_blocks = arena.k.shape[2] // KERNEL_BLOCK
        self.scratch_row = arena.scratch_row
        self.write_rows = torch.full((max_rows,), self.scratch_row, dtype=torch.long, device=dev)
        self.kv_start = torch.zeros(max_rows, dtype=torch.int32, device=dev)
        self.kv_end = torch.zeros(max_rows, dtype=torch.int32, device=dev)
        self.kv_num_blocks = torch.zeros(max_rows, 1, 1, dtype=torch.int32, device=dev)
        self.kv_indices = torch.zeros(max_rows, 1, 1, total_blocks, dtype=torch.int32, device=dev)
        self._block_offsets = torch.arange(total_blocks, dtype=torch.int32, device=dev)

    def fill(self, spans: list[SeqSpan]) -> None:
        """Rows 0..len(spans) from a step's decode spans (one row each); every other row becomes padding."""
        n = len(spans)
        meta = torch.tensor([(s.offset, s.offset + s.start) for s in spans], dtype=torch.int32)
        meta = meta.to(self.kv_start.device, non_blocking=True)
        first, own = meta[:, 0], meta[:, 1]  # arena rows of the session's position 0 and of this row
        self.write_rows.fill_(self.scratch_row)
        self.write_rows[:n] = own
        for t in (self.kv_start, self.kv_end, self.kv_num_blocks):
            t.zero_()
        self.kv_start[:n] = first
        self.kv_end[:n] = own + 1
        self.kv_num_blocks[:n, 0, 0] = own // KERNEL_BLOCK - first // KERNEL_BLOCK + 1
        last = self.kv_indices.shape[-1] - 1  # entries past a row's block count are never read; keep them valid
        self.kv_indices[:n, 0, 0] = ((first // KERNEL_BLOCK)[:, None] + self._block_offsets).clamp_(max=last)


class FlexDecodeAttention:
    """The first `rows` rows of a `DecodeTable`, one query each, over the arena with flex attention."""

    def __init__(self, arena: KVArena, table: DecodeTable, rows: int, flex: Callable = flex_attention):
        self.arena, self.table, self.rows, self.flex = arena, table, rows, flex
        start, end = table.kv_start[:rows], table.kv_end[:rows]

        def own_keys(b, h, q_idx, kv_idx):
            return (kv_idx >= start[b]) & (kv_idx < end[b])

        self.block_mask = BlockMask.from_kv_blocks(
            table.kv_num_blocks[:rows], table.kv_indices[:rows], BLOCK_SIZE=KERNEL_BLOCK, mask_mod=own_keys,
            seq_lengths=(1, arena.k.shape[2]), compute_q_blocks=False,
        )  # fmt: skip

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.arena.write(layer, self.table.write_rows[: self.rows], k, v)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        # one KV batch entry for all query rows: flex broadcasts it when the block mask has the queries' batch
        k, v = self.arena.k[layer][None], self.arena.v[layer][None]
        return self.flex(q[:, :, None], k, v, block_mask=self.block_mask, enable_gqa=True)[:, :, 0]


class CudaGraphDecoder:
    """Decode rows of up to `max_rows` sessions as CUDA graph replays (captured at construction).

    `capture=False` runs the same bucketed forward eagerly with uncompiled flex attention instead (CPU tests).
    """

    def __init__(self, model: LLMModel, arena: KVArena, max_rows: int, capture: bool = True):
        dev = model.device_
        self.model = model
        self.buckets = graph_buckets(max_rows)
        self.table = DecodeTable(max_rows, arena)
        self.embeds = torch.zeros(max_rows, model.hidden_size, dtype=model.dtype, device=dev)
        self.positions = torch.zeros(max_rows, dtype=torch.long, device=dev)
        self.hidden = torch.zeros(max_rows, model.hidden_size, dtype=model.dtype, device=dev)
        self.logits = torch.zeros(max_rows, model.vocab_size, dtype=torch.float32, device=dev)
        flex = torch.compile(flex_attention, dynamic=False) if capture else flex_attention
        self.backends = {b: FlexDecodeAttention(arena, self.table, b, flex) for b in self.buckets}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if capture:
            self._capture()

    def fits(self, n: int) -> bool:
        return n <= self.buckets[-1]

    def _forward(self, b: int) -> None:
        hidden = self.model.forward(self.embeds[:b], self.positions[:b], self.backends[b])
        self.hidden[:b] = hidden
        self.logits[:b] = self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for b in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory pool
            self._forward(b)  # warm-up: compiles flex attention for this shape (the table holds padding rows)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self._forward(b)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()

    @torch.inference_mode()
    def run(
        self, embeds: torch.Tensor, positions: torch.Tensor, spans: list[SeqSpan]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (n, V) and hidden states (n, D) of n decode rows."""
        n = len(spans)
        b = bucket_for(n, self.buckets)
        self.embeds[:n] = embeds
        self.embeds[n:b].zero_()
        self.positions[:n] = positions
        self.positions[n:b].zero_()
        self.table.fill(spans)
        if self.graphs:
            self.graphs[b].replay()
        else:
            self._forward(b)
        return self.logits[:n].clone(), self.hidden[:n].clone()
