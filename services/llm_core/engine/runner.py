"""The engine's forward: one packed batch of decode rows and prefill chunks through the model's own forward pass.

The rows of all sequences are packed into one (N, D) matrix, so the projections and the MLP (nearly all of the
FLOPs) run as single matmuls over the whole batch; the attention backend gives each row its own session's keys
(`attention.ArenaAttention`).

On CUDA the decode rows replay a CUDA graph of the same forward with flex attention (`cuda_graphs`), and the
prefill chunks of the step, if any, run eagerly as a second forward: rows of different sessions are independent,
and one launch of a captured graph beats the per-sequence kernel launches of dozens of decode rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from services.llm_core.engine.attention import ArenaAttention, SeqSpan
from services.llm_core.engine.kv_cache import KVArena
from services.llm_core.model import LLMModel


@dataclass
class ForwardBatch:
    embeds: torch.Tensor  # (N, D): decode rows first, then the prefill chunks
    positions: torch.Tensor  # (N,)
    spans: list[SeqSpan]  # the rows of each sequence, in row order
    num_decodes: int  # the first rows, one per decoding session
    logit_rows: torch.Tensor  # (R,) rows whose next-token logits are needed
    hidden_rows: torch.Tensor  # (S,) rows whose last-layer hidden state is returned


class ModelRunner:
    def __init__(self, model: LLMModel, arena: KVArena, cuda_graph_max_rows: int = 64):
        self.model = model
        self.device = model.device_
        self.attn = ArenaAttention(arena)
        self.graphs = None  # decode rows as graph replays: `fits(n)`, `run(embeds, positions, spans)`
        if self.device.type == "cuda" and cuda_graph_max_rows > 0:
            from services.llm_core.engine.cuda_graphs import CudaGraphDecoder

            self.graphs = CudaGraphDecoder(model, arena, cuda_graph_max_rows)

    @torch.inference_mode()
    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.model.embed_tokens(torch.tensor(ids, dtype=torch.long, device=self.device))

    @torch.inference_mode()
    def forward(self, b: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits (R, V) float32 of `logit_rows`, hidden (S, D) after the final norm of `hidden_rows`)."""
        nd = b.num_decodes
        if self.graphs is None or not nd or not self.graphs.fits(nd):
            hidden = self._eager(b.embeds, b.positions, b.spans)
            return self.model.compute_logits(hidden[b.logit_rows]), hidden[b.hidden_rows]
        logits, hidden = self.graphs.run(b.embeds[:nd], b.positions[:nd], b.spans[:nd])
        if nd < len(b.spans):
            rest = [replace(s, row=s.row - nd) for s in b.spans[nd:]]
            hidden = torch.cat([hidden, self._eager(b.embeds[nd:], b.positions[nd:], rest)])
            logits = torch.cat([logits, self.model.compute_logits(hidden[b.logit_rows[nd:]])])
        # logit rows are the decode rows 0..nd-1 in order, then the prefill rows: `logits` is in that order
        return logits, hidden[b.hidden_rows]

    def _eager(self, embeds: torch.Tensor, positions: torch.Tensor, spans: list[SeqSpan]) -> torch.Tensor:
        self.attn.prepare(spans)
        return self.model.forward(embeds, positions, self.attn)
