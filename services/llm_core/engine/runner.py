"""One batched forward pass over the Qwen2 weights for a mixed batch of prefill chunks and decode tokens.

The rows of all sequences are packed into one (N, D) matrix, so the projections and the MLP (nearly all of the
FLOPs) run as single matmuls over the whole batch. Only attention is per sequence: the decode rows share one
padded SDPA call (each query sees its own session's keys only, via a key mask), each prefill chunk gets its own
SDPA call with a causal mask shifted by its KV offset.

The layer weights and sub-modules (projections, RoPE, RMSNorm, MLP) are the transformers `Qwen2ForCausalLM`
modules themselves; we drive the layers here rather than calling `Qwen2Model.forward` because its attention
reads a contiguous per-batch cache, not sequences of different lengths in a shared block pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from services.llm_core.engine.kv_cache import KVPool
from services.llm_core.model import LLMModel


@dataclass
class PrefillSpan:
    offset: int  # first row in the packed batch
    n: int
    kv_start: int  # session KV position of the first row
    slot_index: torch.Tensor  # (kv_start + n,) pool slots of the session's rows 0 .. kv_start + n


@dataclass
class ForwardBatch:
    embeds: torch.Tensor  # (N, D): decode rows first, then the prefill chunks
    positions: torch.Tensor  # (N,)
    write_slots: torch.Tensor  # (N,) pool slot of each row's K/V
    num_decodes: int
    decode_slot_index: torch.Tensor | None  # (num_decodes, L) pool slots of each decode session's rows, padded
    decode_kv_lens: torch.Tensor | None  # (num_decodes,) valid keys per decode row (incl. itself)
    prefills: list[PrefillSpan]
    logit_rows: torch.Tensor  # (R,) rows whose next-token logits are needed
    hidden_rows: torch.Tensor  # (S,) rows whose last-layer hidden state is returned


class ModelRunner:
    def __init__(self, model: LLMModel, pool: KVPool):
        cfg = model.config
        if getattr(cfg, "use_sliding_window", False):
            raise ValueError("the engine does not implement sliding-window attention (upstream does not use it)")
        self.model = model
        self.pool = pool
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.device = model.device_
        self.dtype = model.dtype

    @torch.inference_mode()
    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.model.embed_tokens(torch.tensor(ids, dtype=torch.long, device=self.device))

    @torch.inference_mode()
    def forward(self, b: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits (R, V) float32 of `logit_rows`, hidden (S, D) after the final norm of `hidden_rows`)."""
        core = self.model.llm.model
        x = b.embeds.to(device=self.device, dtype=self.dtype)
        n = x.shape[0]
        cos, sin = core.rotary_emb(x, b.positions[None])
        cos, sin = cos[0], sin[0]  # (N, head_dim)
        for i, layer in enumerate(core.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(n, self.num_heads, self.head_dim)
            k = attn.k_proj(h).view(n, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(h).view(n, self.num_kv_heads, self.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
            self.pool.write(i, b.write_slots, k, v)
            x = x + attn.o_proj(self._attention(i, q, b).reshape(n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        wanted = torch.cat([b.logit_rows, b.hidden_rows])
        hidden = core.norm(x[wanted])
        r = b.logit_rows.numel()
        logits = self.model.llm.lm_head(hidden[:r]).float()
        return logits, hidden[r:]

    def _attention(self, layer: int, q: torch.Tensor, b: ForwardBatch) -> torch.Tensor:
        """q (N, H, Dh) -> (N, H, Dh), each row attending to its own session's keys."""
        out = torch.empty_like(q)
        nd = b.num_decodes
        if nd:
            k, v = self.pool.read(layer, b.decode_slot_index)  # (B, Hkv, L, Dh)
            keep = torch.arange(k.shape[2], device=q.device)[None] < b.decode_kv_lens[:, None]
            o = F.scaled_dot_product_attention(
                q[:nd].unsqueeze(2), k, v, attn_mask=keep[:, None, None, :], enable_gqa=True
            )
            out[:nd] = o[:, :, 0]
        for span in b.prefills:
            k, v = self.pool.read(layer, span.slot_index[None])
            qs = q[span.offset : span.offset + span.n].transpose(0, 1)[None]  # (1, H, n, Dh)
            if span.kv_start == 0:
                o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, enable_gqa=True)
            else:
                # query i sits at KV position kv_start + i and sees keys 0 .. kv_start + i
                keys = torch.arange(span.kv_start + span.n, device=q.device)
                qpos = torch.arange(span.kv_start, span.kv_start + span.n, device=q.device)
                o = F.scaled_dot_product_attention(
                    qs, k, v, attn_mask=keys[None] <= qpos[:, None], enable_gqa=True
                )
            out[span.offset : span.offset + span.n] = o[0].transpose(0, 1)
        return out
