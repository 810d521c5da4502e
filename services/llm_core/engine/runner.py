"""One batched forward pass over the Qwen2 weights for a mixed batch of prefill chunks and decode tokens.

The rows of all sequences are packed into one (N, D) matrix, so the projections and the MLP (nearly all of the
FLOPs) run as single matmuls over the whole batch. Only attention is per sequence: the decode rows share one
padded SDPA call (each query sees its own session's keys only, via a key mask), each prefill chunk gets its own
SDPA call with a causal mask shifted by its KV offset.

The layer weights and sub-modules (projections, RoPE, RMSNorm, MLP activation) are the transformers
`Qwen2ForCausalLM` modules themselves; we drive the layers here rather than calling `Qwen2Model.forward` because
its attention reads a contiguous per-batch cache, not sequences of different lengths in a shared block pool.

On CPU in fp32 the projection weights are additionally kept prepacked for oneDNN (`mkldnn._linear_pointwise`,
the op PyTorch's own Inductor CPU backend uses for frozen linears): MKL's sgemm repacks the whole weight on every
call, which for the 8-32 row matmuls of a decode step made them ~2x slower than streaming the weight once; with
prepacked weights a 16-session step costs about what the weight reads cost. This deliberately uses an
underscore op (stable in the pinned torch; `prepack=False` turns it off) and costs a second copy of the
projection weights in host memory. Results equal F.linear's to fp32 rounding (~1e-6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
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


PREPACK_BATCH_HINT = 16  # the row count oneDNN tunes the packed layout for; any row count works


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def linear_fn(module: nn.Linear, prepack: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module` as a function of x (N, in), its weight prepacked for oneDNN when asked."""
    if not prepack:
        return module
    weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), PREPACK_BATCH_HINT)
    bias = module.bias.detach() if module.bias is not None else None
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@dataclass
class LayerFns:
    q: Callable[[torch.Tensor], torch.Tensor]
    k: Callable[[torch.Tensor], torch.Tensor]
    v: Callable[[torch.Tensor], torch.Tensor]
    o: Callable[[torch.Tensor], torch.Tensor]
    gate: Callable[[torch.Tensor], torch.Tensor]
    up: Callable[[torch.Tensor], torch.Tensor]
    down: Callable[[torch.Tensor], torch.Tensor]


class ModelRunner:
    def __init__(self, model: LLMModel, pool: KVPool, prepack: bool | None = None):
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
        self.prepacked = can_prepack(self.device, self.dtype) if prepack is None else prepack
        with torch.inference_mode():
            self.layer_fns = [
                LayerFns(
                    *(linear_fn(getattr(layer.self_attn, f"{n}_proj"), self.prepacked) for n in "qkvo"),
                    *(linear_fn(getattr(layer.mlp, f"{n}_proj"), self.prepacked) for n in ("gate", "up", "down")),
                )
                for layer in model.llm.model.layers
            ]
            self.lm_head = linear_fn(model.llm.lm_head, self.prepacked)

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
        for i, (layer, fn) in enumerate(zip(core.layers, self.layer_fns)):
            h = layer.input_layernorm(x)
            q = fn.q(h).view(n, self.num_heads, self.head_dim)
            k = fn.k(h).view(n, self.num_kv_heads, self.head_dim)
            v = fn.v(h).view(n, self.num_kv_heads, self.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
            self.pool.write(i, b.write_slots, k, v)
            x = x + fn.o(self._attention(i, q, b).reshape(n, -1))
            h = layer.post_attention_layernorm(x)
            x = x + fn.down(layer.mlp.act_fn(fn.gate(h)) * fn.up(h))
        wanted = torch.cat([b.logit_rows, b.hidden_rows])
        hidden = core.norm(x[wanted])
        r = b.logit_rows.numel()
        logits = self.lm_head(hidden[:r]).float()
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
