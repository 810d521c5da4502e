"""Code generation for many utterance segments over one KV pool: upstream `prefill_text`, `prefill_audio_ids` and
`generate`, batched across segments.

Each segment owns a slot of the decoder's `KVPool` from its start to its end. Every forward runs over the span of
slots its segments occupy (a view, nothing copied): text chunks of any lengths are prefilled together at their
explicit positions, and each generation step advances all segments by one frame with one sampling call. Span rows
that are not part of the call (free slots, utterances waiting for text) are computed but neither written nor used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.tts_decoder.kv_pool import KVPool
from services.tts_decoder.model import ConditionalChatTTS, batch_visibility, streaming_visibility
from services.tts_decoder.sampler import CodeSampler

CODES_PER_CHUNK = 25  # upstream `output_chunk_size`
MAX_SEGMENT_CODES = 2048  # generation stops once a segment holds more codes than this


@dataclass
class TextPrefill:
    """A text chunk to write into a segment's KV before it generates (upstream `prefill_text` arguments)."""

    ids: torch.Tensor  # (n,) ChatTTS ids
    begin: int  # position of the first id
    spk_emb: torch.Tensor | None  # (num_spk, hidden) when the chunk holds the [spk_emb] slot


@dataclass(eq=False)
class Segment:
    """One utterance segment: its KV slot, text mask and the codes after the condition."""

    slot: int | None  # None once the segment gave its slot back
    text_mask: torch.Tensor  # (condition_length,) int
    greedy: bool = False
    generator: torch.Generator | None = None  # CPU generator of a seeded utterance
    codes: list[torch.Tensor] = field(default_factory=list)  # frames (num_vq,) int64 after [Ptts], seeds included
    finished: bool = False  # a codebook emitted eos


class CodeGenerator:
    def __init__(self, model: ConditionalChatTTS, sampler: CodeSampler, slots: int):
        cfg = model.cfg
        p = model.emb_text.weight
        self.model, self.sampler, self.cfg = model, sampler, cfg
        self.device = p.device
        self.base = model.condition_length - 1  # [Ptts] goes at position 302, code i at 303 + i
        # A segment holds at most the cap plus one chunk of codes (the cap is checked between chunks).
        capacity = model.condition_length + MAX_SEGMENT_CODES + CODES_PER_CHUNK
        self.pool = KVPool(cfg.num_hidden_layers, cfg.num_attention_heads, model.head_dim, capacity, slots, p.dtype,
                           p.device)

    # -- slots -----------------------------------------------------------------------------------------------
    def open(self, text_mask: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> Segment:
        return Segment(self.pool.acquire(), text_mask, greedy, generator)

    def close(self, seg: Segment) -> None:
        if seg.slot is not None:
            self.pool.release(seg.slot)
            seg.slot = None

    def restart(self, seg: Segment, text_mask: torch.Tensor, seed_codes: list[torch.Tensor]) -> None:
        """The next segment of the same utterance in the same slot (upstream starts from a zero KV)."""
        self.pool.clear(seg.slot)
        seg.text_mask, seg.codes, seg.finished = text_mask, list(seed_codes), False

    def kv_len(self, seg: Segment) -> int:
        # [Ptts] takes position `base` and every code but the last has been fed back.
        return self.base + len(seg.codes)

    # -- prefills --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill_text(self, items: list[tuple[Segment, TextPrefill]]) -> None:
        """Upstream `prefill_text` of each segment's chunk, in one forward: the ids at positions begin.., each
        seeing the positions up to its own (no streaming mask in a text prefill)."""
        inputs = []
        for seg, chunk in items:
            n = chunk.ids.shape[0]
            positions = torch.arange(chunk.begin, chunk.begin + n, device=self.device)
            visible = torch.arange(chunk.begin + n, device=self.device)[None, :] <= positions[:, None]
            inputs.append((seg, self.model.embed_text(chunk.ids.to(self.device), chunk.spk_emb), positions, visible))
        self._prefill(inputs)

    @torch.inference_mode()
    def prefill_audio(self, segs: list[Segment]) -> None:
        """Upstream `prefill_audio_ids` at a segment roll-over: [Ptts] and all seed codes but the last (it is the
        next step's input) at 302.., all under the generation mask row of past 302, so they see each other both
        ways."""
        inputs = []
        for seg in segs:
            codes = torch.stack(seg.codes[:-1]).to(self.device)
            embeds = torch.cat([self.model.audio_bos_embedding()[None], self.model.embed_codes(codes)])
            n = embeds.shape[0]
            positions = torch.arange(self.base, self.base + n, device=self.device)
            row = streaming_visibility(self.base, n, seg.text_mask.to(self.device), self.cfg)
            inputs.append((seg, embeds, positions, row.expand(n, -1)))
        self._prefill(inputs)

    def _prefill(self, inputs: list[tuple[Segment, torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """One forward of (segment, embeds (n, H), positions (n,), visible (n, kv)) rows, padded to the longest."""
        if not inputs:
            return
        lo, hi = self._span([seg for seg, *_ in inputs])
        q = max(e.shape[0] for _, e, _, _ in inputs)
        kv_len = max(v.shape[1] for *_, v in inputs)
        embeds = torch.zeros(hi - lo, q, self.cfg.hidden_size, dtype=inputs[0][1].dtype, device=self.device)
        positions = torch.zeros(hi - lo, q, dtype=torch.long, device=self.device)
        visible = torch.zeros(hi - lo, q, kv_len, dtype=torch.bool, device=self.device)
        written = torch.zeros(hi - lo, q, dtype=torch.bool, device=self.device)
        for seg, e, p, v in inputs:
            row, n = seg.slot - lo, e.shape[0]
            embeds[row, :n], positions[row, :n], visible[row, :n, : v.shape[1]], written[row, :n] = e, p, v, True
        self.model(embeds, positions, visible, self.pool.span(lo, hi, positions, kv_len, written))

    # -- generation ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, segs: list[Segment], max_new: int) -> list[list[torch.Tensor]]:
        """Upstream `generate` for several segments at once: up to `max_new` frames each, one forward and one
        sampling call per step for all of them. A segment stops early when any codebook emits eos (the eos frame
        is not kept; `finished` is set). Returns the new frames per segment."""
        new: list[list[torch.Tensor]] = [[] for _ in segs]
        live = [i for i, s in enumerate(segs) if not s.finished]
        if not live:
            return new
        lo, hi = self._span([segs[i] for i in live])
        num_vq = self.cfg.num_vq
        text_masks = torch.zeros(hi - lo, self.model.condition_length, dtype=torch.long, device=self.device)
        last = torch.zeros(hi - lo, num_vq, dtype=torch.long, device=self.device)  # each row's input frame
        is_bos = torch.zeros(hi - lo, 1, dtype=torch.bool, device=self.device)
        for i in live:
            s = segs[i]
            text_masks[s.slot - lo] = s.text_mask.to(self.device)
            if s.codes:
                last[s.slot - lo] = s.codes[-1].to(self.device)
            else:  # first step of a segment: [Ptts] (audio_bos) goes in instead of a code frame
                is_bos[s.slot - lo] = True
        bos = self.model.audio_bos_embedding()
        for step in range(max_new):
            running = [i for i in live if not segs[i].finished]
            if not running:
                break
            rows = torch.tensor([segs[i].slot - lo for i in running], device=self.device)
            pasts = torch.tensor([self.kv_len(segs[i]) for i in running], device=self.device)
            positions = torch.zeros(hi - lo, dtype=torch.long, device=self.device).index_copy_(0, rows, pasts)
            written = None
            if len(running) < hi - lo:  # some span rows idle: their keys are not kept
                written = torch.zeros(hi - lo, 1, dtype=torch.bool, device=self.device).index_fill_(0, rows, True)
            kv_len = max(self.kv_len(segs[i]) for i in running) + 1
            visible = batch_visibility(positions, text_masks, kv_len, self.cfg)
            embeds = torch.where(is_bos, bos, self.model.embed_codes(last))
            span = self.pool.span(lo, hi, positions[:, None], kv_len, written)
            hidden = self.model(embeds[:, None], positions[:, None], visible[:, None], span)
            logits = self.model.head_logits(hidden[rows, 0])
            frames = self.sampler(logits, step, [not segs[i].codes for i in running],
                                  [segs[i].greedy for i in running], [segs[i].generator for i in running])
            last.index_copy_(0, rows, frames)
            is_bos.index_fill_(0, rows, False)
            frames = frames.cpu()  # one device->host copy per step for all rows
            for i, frame, eos in zip(running, frames, (frames == self.model.eos_id).any(-1).tolist()):
                if eos:
                    segs[i].finished = True
                    continue
                segs[i].codes.append(frame)
                new[i].append(frame)
        return new

    @staticmethod
    def _span(segs: list[Segment]) -> tuple[int, int]:
        slots = [s.slot for s in segs]
        return min(slots), max(slots) + 1
