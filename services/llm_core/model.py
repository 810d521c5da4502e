"""The Qwen2 backbone (`llm.`) of MiniCPM-o 2.6: embedding splice, the forward pass, weight loading.

One forward pass serves everything: the engine's batched steps and the solo reference alike. It runs over packed
rows (N, D) of any number of sequences; where each row's keys and values live, and which keys a query sees, is
the business of the attention backend passed in (`Attention`): the engine passes its KV-arena backends
(`services.llm_core.engine.attention`), solo runs pass a `SoloCache`.

Weights: the q/k/v projections are one fused `qkv_proj` and gate/up one `gate_up_proj` (two matmuls where
transformers' Qwen2 runs five). The official checkpoint is read unchanged: `checkpoint_layout` maps each official
tensor to the rows of our parameter it fills (vLLM's stacked-parameter mapping). Layer building blocks are
transformers' own (RMSNorm modules and rotary embedding computed in fewer kernels with the same arithmetic,
`services.common.layers`); `tests/parity/test_llm.py` compares this forward with transformers' `Qwen2ForCausalLM`
on the same weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import Qwen2Config
from transformers.activations import ACT2FN
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, Qwen2RotaryEmbedding

from services.common.checkpoint import CheckpointReader, check_state_dict
from services.common.config import LLMConfig, ModelConfig
from services.common.layers import Rotation, rms_norm

LLM_PREFIX = "llm."
PREPACK_BATCH_HINT = 16  # the row count oneDNN tunes a packed layout for; any row count works

# One embedding piece to write into the token embeddings: rows [start, end) get `embeds` (end - start, D).
Piece = tuple[int, int, torch.Tensor]


class SpliceError(ValueError):
    """Encoder outputs that do not fit the placeholder bounds of the prompt."""


def sequential_pieces(bounds: Sequence[tuple[int, int]], embeds: torch.Tensor) -> list[Piece]:
    """Cut `embeds` (N, D) into consecutive rows for `bounds`, in order, as upstream fills them.

    Images: all slices of all images, each slice's query rows in turn; audio (chunked input): every audio's
    tokens concatenated, filling the 1 s chunk bounds one after another.
    """
    need = sum(e - s for s, e in bounds)
    if embeds.shape[0] != need:
        raise SpliceError(f"{embeds.shape[0]} embedding rows for placeholders of {need} tokens in total")
    pieces, row = [], 0
    for s, e in bounds:
        pieces.append((s, e, embeds[row : row + e - s]))
        row += e - s
    return pieces


def qwen2_config(cfg: LLMConfig) -> Qwen2Config:
    """The transformers config of the backbone (rotary embedding; the transformers parity test)."""
    qcfg = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        use_sliding_window=cfg.use_sliding_window,
        sliding_window=cfg.sliding_window,
        max_window_layers=cfg.max_window_layers,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_dropout=cfg.attention_dropout,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )
    qcfg._attn_implementation = "sdpa"
    return qcfg


# --- attention ----------------------------------------------------------------------------------------------------


class Attention(Protocol):
    """Where the K/V rows of a forward's batch go and which keys each query row sees.

    A backend is set up for one batch before the forward (which sequences the rows belong to, at which positions);
    the model then calls `write` and `attend` once per layer.
    """

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the batch rows' keys and values (N, kv_heads, head_dim) of `layer`."""

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Attention output (N, heads, head_dim) of the batch rows' queries (N, heads, head_dim)."""


def causal_mask(n: int, length: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Additive (n, length) mask for the last n positions of a sequence of `length`: query i sees keys up to
    length - n + i. Float, not boolean: CPU SDPA with a boolean mask can take a much slower path."""
    keys = torch.arange(length, device=device)
    last_key = torch.arange(length - n, length, device=device)
    return torch.zeros(n, length, dtype=dtype, device=device).masked_fill(keys[None] > last_key[:, None], -torch.inf)


def sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q (n, H, Dh): the last n positions of one sequence whose keys/values are k, v (Hkv, L, Dh), read in place.

    `mask`: `causal_mask(n, L)` when the sequence has keys before the first query (L > n); None when n == 1 (a
    decode row sees every key) or n == L (plain causal).
    """
    n, heads, head_dim = q.shape
    kv_heads = k.shape[0]
    if n == 1:
        # One query per head over all keys, the heads sharing a KV head taken together: two matmuls that stream K
        # and V once each, the scores (Hkv, G, L) coming out contiguous along L for the softmax. On CPU (1 thread,
        # 4096 keys) this beat SDPA by ~30% (SDPA with enable_gqa was 2x slower still), and q @ K^T beat
        # K @ q^T + a transposed copy by 10-30%: at long contexts this is a decode step's main cost.
        qg = q.view(kv_heads, heads // kv_heads, head_dim) * head_dim**-0.5
        scores = torch.bmm(qg, k.transpose(1, 2))  # (Hkv, G, L)
        p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        return torch.bmm(p, v).view(1, heads, head_dim)
    qh = q.transpose(0, 1)[None]
    if mask is None:
        o = F.scaled_dot_product_attention(qh, k[None], v[None], is_causal=True, enable_gqa=True)
    else:
        o = F.scaled_dot_product_attention(qh, k[None], v[None], attn_mask=mask, enable_gqa=True)
    return o[0].transpose(0, 1)


class SoloCache:
    """One sequence's KV in contiguous tensors that grow by doubling: the backend of solo runs.

    `begin(n)` before a forward of n new rows, `commit()` after it (then they count in `get_seq_length`).
    """

    def __init__(self, cfg: LLMConfig, dtype: torch.dtype, device: torch.device | str, capacity: int = 256):
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0
        self._n = 0
        self._mask: torch.Tensor | None = None

    def get_seq_length(self) -> int:
        return self.length

    def begin(self, n: int) -> None:
        need = self.length + n
        if need > self.k.shape[2]:
            capacity = max(need, 2 * self.k.shape[2])
            for name in ("k", "v"):
                old = getattr(self, name)
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                setattr(self, name, new)
        self._n = n
        self._mask = causal_mask(n, need, self.k.dtype, self.k.device) if 1 < n < need else None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = self.length + self._n
        self.k[layer, :, self.length : end] = k.transpose(0, 1)
        self.v[layer, :, self.length : end] = v.transpose(0, 1)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        end = self.length + self._n
        return sequence_attention(q, self.k[layer, :, :end], self.v[layer, :, :end], self._mask)

    def commit(self) -> None:
        self.length += self._n
        self._n = 0


# --- layers -------------------------------------------------------------------------------------------------------


class Embedding(nn.Embedding):
    """nn.Embedding that takes ids from any device (callers hand in CPU ids decoded from requests)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids.to(self.weight.device))


class Linear(nn.Linear):
    """nn.Linear that can run on a oneDNN-prepacked copy of its weight (CPU, fp32: `pack_for_onednn`).

    MKL's sgemm repacks the whole weight on every call; for the 1-90 row matmuls of decode steps and live units a
    prepacked weight made the fused projections 1.1-2.4x faster (small config, 1 thread). This uses an underscore
    op (stable in the pinned torch; the op PyTorch's Inductor CPU backend emits for frozen linears) and keeps a
    second copy of the weight in host memory. Results equal F.linear's to fp32 rounding (~1e-6).
    """

    packed: torch.Tensor | None = None

    def pack_for_onednn(self) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PREPACK_BATCH_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class StackedLinear(Linear):
    """Several checkpoint projections of the same input stacked along the output rows: `parts` = (name, rows)."""

    def __init__(self, in_features: int, parts: Sequence[tuple[str, int]], bias: bool):
        super().__init__(in_features, sum(rows for _, rows in parts), bias=bias)
        self.parts = tuple(parts)


class SelfAttention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        parts = [("q_proj", self.q_size), ("k_proj", self.kv_size), ("v_proj", self.kv_size)]
        self.qkv_proj = StackedLinear(cfg.hidden_size, parts, bias=True)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)

    def forward(self, h: torch.Tensor, rotation: Rotation, attn: Attention) -> torch.Tensor:
        n = h.shape[0]
        q, k, v = self.qkv_proj(h).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = rotation(q.view(n, self.num_heads, self.head_dim))
        k = rotation(k.view(n, self.num_kv_heads, self.head_dim))
        attn.write(self.layer, k, v.view(n, self.num_kv_heads, self.head_dim))
        return self.o_proj(attn.attend(self.layer, q).reshape(n, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = StackedLinear(cfg.hidden_size, [("gate_proj", size), ("up_proj", size)], bias=False)
        self.down_proj = Linear(size, cfg.hidden_size, bias=False)
        self.act_fn = ACT2FN[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.input_layernorm = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, layer)
        self.post_attention_layernorm = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rotation: Rotation, attn: Attention) -> torch.Tensor:
        x = x + self.self_attn(rms_norm(self.input_layernorm, x), rotation, attn)
        return x + self.mlp(rms_norm(self.post_attention_layernorm, x))


# --- the model ----------------------------------------------------------------------------------------------------


class LLMModel(nn.Module):
    """Embedding, decoder layers, final norm and lm_head of the backbone. Built on the meta device: weights
    come from the checkpoint (`load_llm_model`) or `random_llm_model`, never from a wasted random init."""

    def __init__(self, cfg: LLMConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        if cfg.use_sliding_window:
            raise ValueError("sliding-window attention is not implemented (upstream does not use it)")
        self.cfg = cfg
        self.config = qwen2_config(cfg)
        self.device_ = torch.device(device)
        self.dtype = dtype
        with torch.device("meta"):
            self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
            self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
            self.norm = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for m in self._weight_modules():
            m.to(dtype)
        self._tie()
        with torch.device(self.device_):
            self.rotary_emb = Qwen2RotaryEmbedding(self.config)  # fp32 inverse frequencies, not in the checkpoint
        self.eval().requires_grad_(False)

    def _weight_modules(self) -> tuple[nn.Module, ...]:
        return self.embed_tokens, self.layers, self.norm, self.lm_head

    def _tie(self) -> None:
        if self.cfg.tie_word_embeddings:  # one tensor, saved once as embed_tokens
            self.lm_head.weight = self.embed_tokens.weight

    def allocate(self) -> None:
        """Give the meta weights real (uninitialised) storage on the model's device."""
        for m in self._weight_modules():
            m.to_empty(device=self.device_)
        self._tie()

    def linears(self) -> list[Linear]:
        return [m for m in self.modules() if isinstance(m, Linear)]

    def pack_for_onednn(self) -> None:
        for m in self.linears():
            m.pack_for_onednn()

    @property
    def prepacked(self) -> bool:
        return self.lm_head.packed is not None

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    # --- embedding splice -------------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, pieces: Sequence[Piece] = ()) -> torch.Tensor:
        """Token embeddings (T, D) of `input_ids` (T,) with encoder outputs written at their bounds.

        Upstream (`get_vllm_embedding` / `get_omni_embedding`) overwrites the placeholder rows in place; the
        placeholder token embeddings themselves never reach the LLM.
        """
        if input_ids.dim() != 1:
            raise SpliceError(f"input_ids must be 1-D (T,), got shape {tuple(input_ids.shape)}")
        out = self.embed_tokens(input_ids)
        T = out.shape[0]
        for start, end, rows in pieces:
            if not 0 <= start <= end <= T:
                raise SpliceError(f"bound ({start}, {end}) outside the prompt of {T} tokens")
            if tuple(rows.shape) != (end - start, self.hidden_size):
                raise SpliceError(
                    f"embeddings of shape {tuple(rows.shape)} do not fit bound ({start}, {end}) "
                    f"(needs ({end - start}, {self.hidden_size}))"
                )
            out[start:end] = rows.to(device=out.device, dtype=out.dtype)
        return out

    # --- forward ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, attn: Attention) -> torch.Tensor:
        """Last-layer hidden states after the final norm (N, D) of the packed rows `embeds` (N, D) at
        `positions` (N,), each row attending as `attn` (set up for this batch) says."""
        x = embeds.to(device=self.device_, dtype=self.dtype)
        cos, sin = self.rotary_emb(x, positions.to(self.device_)[None])
        rotation = Rotation(cos[0], sin[0])
        for layer in self.layers:
            x = layer(x, rotation, attn)
        return rms_norm(self.norm, x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, D) final-norm hidden states -> (R, V) float32 logits."""
        return self.lm_head(hidden).float()

    def new_cache(self) -> SoloCache:
        return SoloCache(self.cfg, self.dtype, self.device_)

    def step(
        self, inputs_embeds: torch.Tensor, cache: SoloCache, last_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Solo prefill/decode: append `inputs_embeds` (T, D) to `cache`; returns logits (T, V) (or (1, V) of the
        last row when `last_only`) and hidden (T, D)."""
        n = inputs_embeds.shape[0]
        positions = torch.arange(cache.length, cache.length + n, device=self.device_)
        cache.begin(n)
        hidden = self.forward(inputs_embeds, positions, cache)
        cache.commit()
        return self.compute_logits(hidden[-1:] if last_only else hidden), hidden


# --- weights ------------------------------------------------------------------------------------------------------


def checkpoint_name(param: str) -> str:
    """Our parameter path as the official checkpoint spells it (fused parameters excepted)."""
    return LLM_PREFIX + (param if param.startswith("lm_head.") else "model." + param)


def checkpoint_layout(model: LLMModel) -> dict[str, tuple[str, int, tuple[int, ...]]]:
    """Every official `llm.` tensor the backbone reads -> (our parameter, first row in it, its shape).

    A fused parameter takes its parts in order along dim 0: `qkv_proj` = q_proj, k_proj, v_proj rows (weight and
    bias), `gate_up_proj` = gate_proj, up_proj rows.
    """
    layout: dict[str, tuple[str, int, tuple[int, ...]]] = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            ours = f"{mod_name}.{p_name}"
            if not isinstance(module, StackedLinear):
                layout[checkpoint_name(ours)] = (ours, 0, tuple(p.shape))
                continue
            parent = mod_name.rsplit(".", 1)[0]
            row = 0
            for part, rows in module.parts:
                layout[checkpoint_name(f"{parent}.{part}.{p_name}")] = (ours, row, (rows, *p.shape[1:]))
                row += rows
    return layout


def can_prepack(device: torch.device | str, dtype: torch.dtype) -> bool:
    return torch.device(device).type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def _finish(model: LLMModel, prepack: bool | None) -> LLMModel:
    if prepack if prepack is not None else can_prepack(model.device_, model.dtype):
        model.pack_for_onednn()
    return model


def build_llm_model(
    cfg: ModelConfig | LLMConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LLMModel:
    """An LLMModel with meta-device weights (for shape checks, or to be loaded)."""
    return LLMModel(cfg.llm if isinstance(cfg, ModelConfig) else cfg, device=device, dtype=dtype)


def random_llm_model(
    cfg: ModelConfig | LLMConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    prepack: bool | None = None,
) -> LLMModel:
    """An LLMModel with random weights (benchmarks of configs that have no checkpoint, e.g. `small_config()`).

    Scales keep activations O(1) through the depth: linear weights N(0, 1/fan_in), embeddings N(0, 1), norms 1.
    """
    model = build_llm_model(cfg, device=device, dtype=dtype)
    model.allocate()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=gen)
            elif name.startswith("embed_tokens"):
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
    return _finish(model, prepack)


def load_llm_model(
    model_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    prepack: bool | None = None,
) -> LLMModel:
    """Build the backbone from `config.json` and fill it from the `llm.` tensors of the shards, one layer at a
    time (peak memory: the model plus one layer). `prepack`: oneDNN-packed linears (default: on CPU in fp32)."""
    model = build_llm_model(ModelConfig.from_model_dir(model_dir), device=device, dtype=dtype)
    reader = CheckpointReader(model_dir)
    layout = checkpoint_layout(model)
    found = {k: reader.shape(k) for k in reader.keys([LLM_PREFIX])}
    check_state_dict({k: shape for k, (_, _, shape) in layout.items()}, found, f"{reader.model_dir} [{LLM_PREFIX!r}]")
    model.allocate()
    params = dict(model.named_parameters())
    groups = [[f"{LLM_PREFIX}model.layers.{i}."] for i in range(model.cfg.num_hidden_layers)]
    groups.append([f"{LLM_PREFIX}model.embed_tokens.", f"{LLM_PREFIX}model.norm.", f"{LLM_PREFIX}lm_head."])
    with torch.no_grad():
        for prefixes in tqdm(groups, desc=f"loading {LLM_PREFIX}", unit="layer", disable=not progress):
            for key, tensor in reader.load(prefixes, dtype=dtype, device=device).items():
                name, row, shape = layout[key]
                params[name][row : row + shape[0]].copy_(tensor)
    return _finish(model, prepack)
