"""ConditionalChatTTS (`tts.`): speaker projector, text/code embeddings, Llama backbone, weight-normed code heads.

Sequence layout (upstream): `[Stts] [spk_emb] [300 reserved text slots] [Ptts=audio_bos] codes...`. Positions
0..301 start as zeros and text chunks are prefilled at their explicit positions; generated codes append from 302 on.
Attention visibility follows upstream's streaming mask exactly, including its quirk that the [Ptts] slot (302) is
never visible.

The backbone's modules and weights are transformers' `LlamaModel` (official names, loaded as they are); the forward
pass runs its layers with the q/k/v projections as one matmul and gate/up as another (two where transformers runs
five, as services/llm_core does for the LLM), its norms and rotary embedding in fewer kernels (the same arithmetic:
`services.common.layers`), its own activation, and the caller's KV.

Modules, forward passes, masks and weight loading only: the KV slots are in kv_pool.py, sampling in sampler.py, the
generation loop in generation.py, utterance bookkeeping in streaming.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as P
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from transformers import LlamaConfig, LlamaModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from services.common.checkpoint import CheckpointReader, load_module
from services.common.config import TTSConfig
from services.common.layers import MultiModalProjector, Rotation, rms_norm

TTS_PREFIXES = ("tts.projector.", "tts.emb_code.", "tts.emb_text.", "tts.head_code.", "tts.model.")


def make_streaming_chunk_mask_generation(
    past_seen_tokens: int, q_len: int, text_mask: torch.Tensor, cfg: TTSConfig
) -> torch.Tensor:
    """Upstream's additive mask (1, 1, 1, past+q): 0 visible, finfo(float32).min hidden; one row for all queries.

    Text slot j is hidden from `min(ceil((past-300)/50)*10, 300) + 2` up to and including slot 302 ([Ptts]), and
    slots whose `text_mask` is 0 ([PAD]) are hidden. Audio slots (>= 303) are all visible.
    """
    visible = streaming_visibility(past_seen_tokens, q_len, text_mask, cfg)
    mask = torch.zeros(1, 1, 1, visible.shape[0], dtype=torch.float32)
    mask[0, 0, 0, ~visible.cpu()] = torch.finfo(torch.float32).min
    return mask


def streaming_visibility(past_seen_tokens: int, q_len: int, text_mask: torch.Tensor, cfg: TTSConfig) -> torch.Tensor:
    """Boolean form of `make_streaming_chunk_mask_generation` (True = visible), length past+q."""
    n_start = 1 + cfg.num_spk_embs * int(cfg.use_speaker_embedding)
    reserved = cfg.streaming_text_reserved_len
    chunks = math.ceil((past_seen_tokens - reserved) / cfg.streaming_audio_chunk_size)
    hidden_from = min(chunks * cfg.streaming_text_chunk_size, reserved) + n_start
    hidden_to = reserved + n_start + 1
    visible = torch.ones(past_seen_tokens + q_len, dtype=torch.bool, device=text_mask.device)
    visible[hidden_from:hidden_to] = False
    n_cond = n_start + reserved + 1
    visible[:n_cond] &= text_mask[:n_cond] != 0
    return visible


def batch_visibility(pasts: torch.Tensor, text_masks: torch.Tensor, kv_len: int, cfg: TTSConfig) -> torch.Tensor:
    """`streaming_visibility` for one generation step of B segments: (B, kv_len) bool, False past each row's
    own length. pasts (B,) int64, text_masks (B, condition_length)."""
    n_start = 1 + cfg.num_spk_embs * int(cfg.use_speaker_embedding)
    reserved = cfg.streaming_text_reserved_len
    chunks = -torch.div(reserved - pasts, cfg.streaming_audio_chunk_size, rounding_mode="floor")  # ceil
    hidden_from = torch.clamp(chunks * cfg.streaming_text_chunk_size, max=reserved) + n_start
    hidden_to = reserved + n_start + 1
    slot = torch.arange(kv_len, device=pasts.device)[None, :]
    visible = (slot <= pasts[:, None]) & ~((slot >= hidden_from[:, None]) & (slot < hidden_to))
    n_cond = text_masks.shape[1]
    visible[:, :n_cond] &= text_masks[:, : min(n_cond, kv_len)] != 0
    return visible


def _llama_config(cfg: TTSConfig) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_hidden_layers=cfg.num_hidden_layers,
        max_position_embeddings=cfg.max_position_embeddings,
        attn_implementation=cfg.attn_implementation,
    )


class ConditionalChatTTS(nn.Module):
    """The `tts.` modules used at inference (the DVAE is in dvae.py, loaded by the vocoder side)."""

    def __init__(self, cfg: TTSConfig):
        super().__init__()
        if not cfg.use_mlp or not cfg.use_speaker_embedding or cfg.use_llm_hidden_state:
            raise NotImplementedError("only the MiniCPM-o 2.6 TTS variant (use_mlp, speaker embedding) is supported")
        self.cfg = cfg
        self.projector = MultiModalProjector(cfg.llm_dim, cfg.hidden_size)
        self.emb_code = nn.ModuleList(nn.Embedding(cfg.num_audio_tokens, cfg.hidden_size) for _ in range(cfg.num_vq))
        self.emb_text = nn.Embedding(cfg.num_text_tokens, cfg.hidden_size)
        self.head_code = nn.ModuleList(
            weight_norm(nn.Linear(cfg.hidden_size, cfg.num_audio_tokens, bias=False), name="weight")
            for _ in range(cfg.num_vq)
        )
        self.model = LlamaModel(_llama_config(cfg))
        # Inputs are always inputs_embeds: LlamaModel's own 32000-token table is dead weight (UNUSED_AT_INFERENCE).
        self.model.embed_tokens = None
        self.n_start = 1 + cfg.num_spk_embs
        self.condition_length = self.n_start + cfg.streaming_text_reserved_len + 1
        self.eos_id = cfg.num_audio_tokens - 1
        self._head_weight: torch.Tensor | None = None
        self._fused: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (q|k|v, gate|up) weights

    @property
    def head_dim(self) -> int:
        return self.cfg.hidden_size // self.cfg.num_attention_heads

    # -- embeddings ------------------------------------------------------------------------------------------
    def speaker_embedding(self, spk_hidden: torch.Tensor) -> torch.Tensor:
        """(B, llm_dim) -> (B, hidden): projected and L2-normalised (upstream `merge_inputs_embeds`)."""
        spk_hidden = spk_hidden.to(self.projector.linear1.weight.dtype)
        return F.normalize(self.projector(spk_hidden), p=2, dim=-1)

    def embed_text(self, ids: torch.Tensor, spk_emb: torch.Tensor | None) -> torch.Tensor:
        """(T,) ids -> (T, hidden); the [spk_emb] slots take `spk_emb` (num_spk, hidden) when present."""
        embeds = self.emb_text(ids)
        slots = ids == self.cfg.spk_emb_token_id
        if bool(slots.any()):
            if spk_emb is None:
                raise ValueError("text chunk holds [spk_emb] but no speaker embedding was given")
            embeds[slots] = spk_emb.to(embeds.dtype)
        return embeds

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., num_vq) codes -> (..., hidden): sum of the per-codebook embeddings."""
        return torch.stack([emb(codes[..., q]) for q, emb in enumerate(self.emb_code)], -1).sum(-1)

    def audio_bos_embedding(self) -> torch.Tensor:
        ids = torch.tensor([self.cfg.audio_bos_token_id], device=self.emb_text.weight.device)
        return self.emb_text(ids)[0]

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., num_vq, num_audio_tokens) float32 logits."""
        if self._head_weight is None:
            # weight_norm recomputes g * v / |v| on every access; the weights are fixed at inference, so do it once.
            with P.cached():
                self._head_weight = torch.cat([head.weight for head in self.head_code]).detach()
        logits = F.linear(hidden, self._head_weight)
        return logits.unflatten(-1, (self.cfg.num_vq, self.cfg.num_audio_tokens)).float()

    # -- backbone --------------------------------------------------------------------------------------------
    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor,
                cache) -> torch.Tensor:
        """inputs (B, q, H) at positions (B, q); visible (B, q, kv_len) bool; returns last hidden (B, q, H).

        `cache` holds the B rows' KV (a `kv_pool.SlotSpan`): `update(keys, values, layer)` stores the new (B, heads,
        q, head_dim) keys and values where this forward writes them and returns the (B, heads, kv_len, head_dim)
        ones to attend to."""
        # Additive float mask as upstream (finfo.min = hidden): CPU SDPA is ~1000x slower with a boolean mask.
        dtype = inputs_embeds.dtype
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        mask = mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]
        rotation = Rotation(*self.model.rotary_emb(inputs_embeds, positions))
        b, q, _ = inputs_embeds.shape
        heads, head_dim = self.cfg.num_attention_heads, self.head_dim
        x = inputs_embeds
        for i, (layer, (qkv, gate_up)) in enumerate(zip(self.model.layers, self.fused_weights())):
            h = F.linear(rms_norm(layer.input_layernorm, x), qkv).view(b, q, 3, heads, head_dim)
            h = h.permute(2, 0, 3, 1, 4)  # (3, B, heads, q, head_dim)
            queries, keys = rotation(h[:2])
            keys, values = cache.update(keys, h[2], i)
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
            x = x + layer.self_attn.o_proj(out.transpose(1, 2).reshape(b, q, heads * head_dim))
            gate, up = F.linear(rms_norm(layer.post_attention_layernorm, x), gate_up).chunk(2, dim=-1)
            x = x + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        return rms_norm(self.model.norm, x)

    def fused_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the q|k|v and gate|up weights stacked along the output rows. Built once from the loaded
        weights; the separate projections' weights then become views of them (one copy in memory, official names
        and shapes kept)."""
        if self._fused is None:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors: the parameters are re-pointed
                self._fused = [(_stack_rows(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                                _stack_rows(layer.mlp.gate_proj, layer.mlp.up_proj)) for layer in self.model.layers]
        return self._fused


def _stack_rows(*linears: nn.Linear) -> torch.Tensor:
    stacked = torch.cat([linear.weight for linear in linears])
    row = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(stacked[row : row + rows], requires_grad=False)
        row += rows
    return stacked


def with_prefix(prefix: str, module: nn.Module) -> nn.Module:
    """Nest `module` under ModuleDicts so its state-dict names carry the checkpoint prefix (e.g. "tts.")."""
    for part in reversed(prefix.rstrip(".").split(".")):
        module = nn.ModuleDict({part: module})
    return module


def build_tts(cfg: TTSConfig, device: torch.device | str = "meta") -> ConditionalChatTTS:
    with torch.device(device):
        return ConditionalChatTTS(cfg)


def load_tts(reader: CheckpointReader, cfg: TTSConfig, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, progress: bool = False) -> ConditionalChatTTS:
    """Build on the meta device, assign the checkpoint tensors, then materialise the rotary table on `device`."""
    model = build_tts(cfg, "meta")
    load_module(with_prefix("tts.", model), reader, TTS_PREFIXES, dtype=dtype, device=device, progress=progress)
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(config=model.model.config)
    return model.eval()
