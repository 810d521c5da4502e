"""ConditionalChatTTS (`tts.`): speaker projector, text/code embeddings, Llama backbone, weight-normed code heads.

Sequence layout (upstream): `[Stts] [spk_emb] [300 reserved text slots] [Ptts=audio_bos] codes...`. The KV cache is
preallocated: slots 0..301 start as zeros and text chunks are prefilled at their explicit positions; generated
codes append from slot 302 on. Attention visibility follows upstream's streaming mask exactly, including its quirk
that the [Ptts] slot (302) is never visible.

Forward passes, masks, sampling and weight loading only; utterance bookkeeping lives in streaming.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as P
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from transformers import LlamaConfig, LlamaModel, TopKLogitsWarper, TopPLogitsWarper
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from services.common.checkpoint import CheckpointReader, load_module
from services.common.config import TTSConfig
from services.common.layers import MultiModalProjector

TTS_PREFIXES = ("tts.projector.", "tts.emb_code.", "tts.emb_text.", "tts.head_code.", "tts.model.")
# Upstream sampling constants (hard-coded in `_generate_mel_spec*`, `gen_logits` and `generate`).
TEMPERATURES = (0.1, 0.3, 0.1, 0.3)
MIN_TOKENS_TO_KEEP = 3
MIN_NEW_TOKENS = 10  # eos is masked for the first 10 steps of EVERY generate call (upstream quirk)


class KVCache:
    """Per-layer K/V buffers (B, heads, capacity, head_dim) written at explicit positions (gpt-fast style).

    Passed to LlamaModel as `past_key_values`: each attention layer calls `update`, which writes the new keys at
    the positions bound by `bind` and returns the first `kv_len` slots for attention (the 4D mask decides what
    is visible, so zero slots that were never prefilled behave as upstream's zero-initialised cache).
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self._rows: torch.Tensor | None = None
        self._subset: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._kv_len = 0

    @classmethod
    def zeros(cls, layers: int, heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
              device: torch.device | str, batch: int = 1) -> "KVCache":
        shape = (batch, heads, capacity, head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)])

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @staticmethod
    def stack(caches: list["KVCache"], lengths: list[int], capacity: int) -> "KVCache":
        """One batch cache from single-row caches (their first `lengths` slots), rows then become views of it."""
        ref = caches[0].keys[0]
        batch = KVCache.zeros(len(caches[0].keys), ref.shape[1], ref.shape[3], capacity, ref.dtype, ref.device,
                              batch=len(caches))
        for b, (c, n) in enumerate(zip(caches, lengths)):
            for layer in range(len(c.keys)):
                batch.keys[layer][b, :, :n] = c.keys[layer][0, :, :n]
                batch.values[layer][b, :, :n] = c.values[layer][0, :, :n]
        for b, c in enumerate(caches):
            c.keys = [k[b : b + 1] for k in batch.keys]
            c.values = [v[b : b + 1] for v in batch.values]
        return batch

    def bind(self, positions: torch.Tensor, kv_len: int, rows: torch.Tensor | None = None) -> None:
        """Positions (B, q) the next forward writes at, how many slots it reads, and (optionally) which batch rows
        it runs on (a subset: reads then gather those rows)."""
        if kv_len > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} slots cannot hold {kv_len}")
        self._subset = rows
        if rows is None:
            rows = torch.arange(positions.shape[0], device=positions.device)
        self._rows = rows[:, None].expand_as(positions)
        self._pos = positions
        self._kv_len = kv_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[self._rows, :, self._pos] = key_states.transpose(1, 2).to(k.dtype)
        v[self._rows, :, self._pos] = value_states.transpose(1, 2).to(v.dtype)
        if self._subset is not None:
            return k[self._subset, :, : self._kv_len], v[self._subset, :, : self._kv_len]
        return k[:, :, : self._kv_len], v[:, :, : self._kv_len]


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

    @property
    def head_dim(self) -> int:
        return self.cfg.hidden_size // self.cfg.num_attention_heads

    def new_cache(self, capacity: int) -> KVCache:
        """Upstream's zero KV of the 302 condition slots, with room for `capacity` slots in all."""
        p = self.emb_text.weight
        return KVCache.zeros(self.cfg.num_hidden_layers, self.cfg.num_attention_heads, self.head_dim,
                             max(capacity, self.condition_length - 1), p.dtype, p.device)

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
                cache: KVCache, rows: torch.Tensor | None = None) -> torch.Tensor:
        """inputs (B, q, H) at positions (B, q); visible (B, q, kv_len) bool; returns last hidden (B, q, H).

        `rows`: the cache rows the B inputs belong to (default: all rows, in order)."""
        cache.bind(positions, visible.shape[-1], rows)
        # Additive float mask as upstream (finfo.min = hidden): CPU SDPA is ~1000x slower with a boolean mask.
        dtype = inputs_embeds.dtype
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        out = self.model(inputs_embeds=inputs_embeds, position_ids=positions, attention_mask=mask[:, None],
                         past_key_values=cache, use_cache=False)
        return out.last_hidden_state

    def prefill_text(self, cache: KVCache, ids: torch.Tensor, begin: int, spk_emb: torch.Tensor | None) -> None:
        """Upstream `prefill_text` for one utterance: text ids at positions begin.., causal over slots 0..position."""
        self.prefill_text_rows(cache, [TextPrefill(ids, begin, spk_emb)], None)

    def prefill_text_rows(self, cache: KVCache, chunks: list["TextPrefill"], rows: torch.Tensor | None) -> None:
        """`prefill_text` of equally long chunks into the given rows of a batch cache, in one forward."""
        device = self.emb_text.weight.device
        n = chunks[0].ids.shape[0]
        positions = torch.stack([torch.arange(c.begin, c.begin + n, device=device) for c in chunks])
        kv_len = int(positions[:, -1].max()) + 1
        visible = torch.arange(kv_len, device=device)[None, None, :] <= positions[:, :, None]
        embeds = torch.stack([self.embed_text(c.ids.to(device), c.spk_emb) for c in chunks])
        self(embeds, positions, visible, cache, rows)

    def prefill_audio(self, cache: KVCache, codes: torch.Tensor, text_mask: torch.Tensor) -> None:
        """Upstream `prefill_audio_ids` (segment roll-over): [Ptts] + codes at 302.., one mask row for all queries.

        The row is the generation mask at past 302, so the prefilled codes see each other in both directions.
        """
        device = self.emb_text.weight.device
        embeds = torch.cat([self.audio_bos_embedding()[None], self.embed_codes(codes.to(device))])
        past = self.condition_length - 1
        positions = torch.arange(past, past + embeds.shape[0], device=device)
        row = streaming_visibility(past, embeds.shape[0], text_mask.to(device), self.cfg)
        self(embeds[None], positions[None], row.expand(embeds.shape[0], -1)[None], cache)


@dataclass
class TextPrefill:
    """A text chunk to write into a segment's KV before it generates (upstream `prefill_text` arguments)."""

    ids: torch.Tensor  # (n,) ChatTTS ids
    begin: int  # position of the first id
    spk_emb: torch.Tensor | None  # (num_spk, hidden) when the chunk holds the [spk_emb] slot


@dataclass
class CodeGenState:
    """One utterance segment's generation state: its KV cache and the codes after the condition."""

    cache: KVCache
    text_mask: torch.Tensor  # (condition_length,) int
    base: int  # condition_length - 1: slots before [Ptts]
    codes: list[torch.Tensor] = field(default_factory=list)  # frames (num_vq,) int64 after [Ptts], seeds included
    greedy: bool = False
    generator: torch.Generator | None = None
    finished: bool = False  # a codebook emitted eos

    @property
    def kv_len(self) -> int:
        # [Ptts] takes slot `base` and every code but the last has been fed back.
        return self.base + len(self.codes)


class CodeSampler:
    """Upstream's per-step code choice: temperature per codebook, top-p 0.7 / top-k 20 (min 3 kept, skipped on
    the [Ptts] step), eos masked for the first 10 steps of a call, multinomial; or argmax when greedy."""

    def __init__(self, cfg: TTSConfig, eos_id: int, force_no_stop: bool = False):
        self.eos_id = eos_id
        self.force_no_stop = force_no_stop  # upstream's `force_no_stop`: eos never sampled (fixed-length benches)
        self.warpers = [TopPLogitsWarper(cfg.top_p, min_tokens_to_keep=MIN_TOKENS_TO_KEEP),
                        TopKLogitsWarper(cfg.top_k, min_tokens_to_keep=MIN_TOKENS_TO_KEEP)]
        self.temperatures = torch.tensor(TEMPERATURES, dtype=torch.float32)[:, None]
        if cfg.repetition_penalty != 1.0:
            raise NotImplementedError("upstream runs the TTS with repetition_penalty 1.0 (processor off)")

    def __call__(self, logits: torch.Tensor, step_in_call: int, is_bos_step: bool, greedy: bool,
                 generator: torch.Generator | None) -> torch.Tensor:
        """logits (num_vq, V) float32 -> codes (num_vq,) int64."""
        logits = logits / self.temperatures.to(logits.device)
        if not is_bos_step:
            for warp in self.warpers:
                logits = warp(None, logits)
        if step_in_call < MIN_NEW_TOKENS or self.force_no_stop:
            logits[:, self.eos_id] = -torch.inf
        if greedy:
            return logits.argmax(-1)
        probs = F.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.inference_mode()
def generate_codes(model: ConditionalChatTTS, sampler: CodeSampler, states: list[CodeGenState], max_new: int,
                   prefills: list[TextPrefill | None] | None = None) -> list[list[torch.Tensor]]:
    """Upstream `prefill_text` + `generate` for several segments at once: up to `max_new` frames each.

    The segments' KV rows are gathered into one batch cache (they stay views of it); text chunks of equal length
    are prefilled in one forward, then every generation step runs all segments together. A segment stops early
    when any codebook emits eos (the eos frame is not kept; `finished` is set). Returns the new frames per segment.
    """
    device = model.emb_text.weight.device
    new: list[list[torch.Tensor]] = [[] for _ in states]
    active = [i for i, s in enumerate(states) if not s.finished]
    if not active:
        return new
    lengths = [states[i].kv_len for i in active]
    cache = KVCache.stack([states[i].cache for i in active], lengths, max(lengths) + max_new)
    by_len: dict[int, list[int]] = {}
    for row, i in enumerate(active):
        if prefills is not None and prefills[i] is not None:
            by_len.setdefault(prefills[i].ids.shape[0], []).append(row)
    for rows in by_len.values():
        model.prefill_text_rows(cache, [prefills[active[r]] for r in rows], torch.tensor(rows, device=device))
    bos = model.audio_bos_embedding()
    text_masks = torch.stack([states[i].text_mask for i in active]).to(device)
    running = [True] * len(active)
    for step in range(max_new):
        if not any(running):
            break
        segs = [states[i] for i in active]
        # Stopped rows are fed a dummy step: it writes only their next free slot, which is rewritten before it
        # can be read, so every row keeps its own exact state while the batch shape stays fixed.
        last = torch.stack([s.codes[-1] if s.codes else torch.zeros(model.cfg.num_vq, dtype=torch.long)
                            for s in segs]).to(device)
        embeds = model.embed_codes(last)
        for j, s in enumerate(segs):
            if not s.codes:  # first step of a segment: [Ptts] (audio_bos) goes in instead of a code frame
                embeds[j] = bos
        past = torch.tensor([s.kv_len for s in segs], device=device)
        kv_len = int(past.max()) + 1
        visible = batch_visibility(past, text_masks, kv_len, model.cfg)[:, None]
        hidden = model(embeds[:, None], past[:, None], visible, cache)
        logits = model.head_logits(hidden[:, 0])
        rows = [j for j in range(len(segs)) if running[j]]
        # One device->host copy per step for all rows (each row samples with its own generator).
        frames = torch.stack([sampler(logits[j], step, not segs[j].codes, segs[j].greedy, segs[j].generator)
                              for j in rows]).cpu()
        for j, frame in zip(rows, frames):
            s = segs[j]
            if bool((frame == model.eos_id).any()):
                s.finished = True
                running[j] = False
                continue
            s.codes.append(frame)
            new[active[j]].append(frame)
    return new


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
