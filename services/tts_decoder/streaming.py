"""Streaming speech synthesis of LLM text, as upstream `_generate_mel_spec_audio_streaming` does it.

Per utterance (an explicit `UtteranceState`): text arrives in pieces and is normalised (digits read one by one,
`*` dropped). Every time 10 more TTS text tokens exist, they are prefilled and 25 codes are generated, decoded
with a 4-code overlap, vocoded and cross-faded, and the new audio is emitted at once. When the text ends, the
rest is prefilled and generation runs to eos (or past 2048 codes). A segment that reaches 120 text tokens closes
at the next sentence end; a new segment starts seeded with its last 5 text tokens and last 50 codes.

Deliberate differences from upstream, none of which changes the codes for the same text:
- upstream runs at most one 10-token chunk per LLM text piece; here every ready chunk runs (the schedule then
  equals the non-streaming `_generate_mel_spec` one, so greedy streaming codes equal non-streaming codes);
- upstream's first text piece skips normalisation (it is read before the loop); here every piece is normalised;
- upstream truncates a segment past 300 tokens and drops the rest of the answer; here a segment that would pass
  299 text tokens without a sentence end is cut at its last sentence end, clause mark or space before the limit
  (hard cut if none) and closes, and the rest goes on in the next segment, so any answer is spoken whole;
- upstream pulls text from the LLM only while it generates; here text pushed while a segment closes waits, and
  after the roll-over it is taken piece by piece as upstream would have read it.

Several utterances share a replica: each holds a slot of the decoder's KV pool while it speaks, and `step_many`
advances every utterance with work by one chunk, batching the 25 generation steps (generation.py).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from services.common.checkpoint import CheckpointReader
from services.common.config import ModelConfig, TTSConfig
from services.tts_decoder.generation import CODES_PER_CHUNK, MAX_SEGMENT_CODES, CodeGenerator, Segment, TextPrefill
from services.tts_decoder.model import ConditionalChatTTS, load_tts
from services.tts_decoder.sampler import CodeSampler
from services.tts_decoder.text import (
    ChatTTSText,
    EmptyTextError,
    TTSInputError,
    detect_language,
    normalize,
    sentence_end,
)
from services.tts_decoder.vocoder import SAMPLE_RATE, VocoderStream, WaveDecoder

SEGMENT_SHIFT = 180  # a segment may close at a sentence end once it has reserved - 180 = 120 text tokens
SEED_TEXT_TOKENS = 5
SEED_CODES = 50
TTS_EOS_TEXT = "<|tts_eos|>"
# KV slots per decoder (the deployment's default utterance limit). A slot holds 303 + 2048 + 25 positions of every
# layer: 146 MB in bf16 at the real config (20 layers, 12 heads of 64), allocated once when the decoder is built.
MAX_UTTERANCES = 64


class SpeakerEmbeddingError(TTSInputError):
    pass


@dataclass
class SpeechChunk:
    codes: torch.Tensor  # (n, num_vq) int64: the codes new in this chunk
    audio: np.ndarray | None  # float32 mono; None when the decoder runs without a vocoder
    sample_rate: int = SAMPLE_RATE
    text: str = ""  # raw text received since the previous chunk
    end_of_segment: bool = False  # a vocoder flushes its held tail after this chunk (and starts a new cross-fade)


@dataclass
class UtteranceState:
    """Everything one utterance needs between calls; owned by the caller (its KV slot is the decoder's: give it
    back with `SpeechDecoder.release` if the utterance ends without finishing)."""

    spk_emb: torch.Tensor  # (num_spk, hidden) projected, normalised speaker embedding
    seg: Segment  # KV slot, codes and text mask of the current segment
    vocoder: VocoderStream | None
    language: str | None = None
    pieces: int = 0  # text pieces received (the language is detected on the first two)
    raw_text: str = ""
    text_reported: int = 0  # raw_text[:text_reported] was attached to emitted chunks
    seg_text: str = ""  # normalised text of the current segment
    # Normalised text for the next segments while the current one closes: (piece, raw piece for the sentence-end
    # check, or None for the rest of a cut piece, which upstream never checks).
    pending: list[tuple[str, str | None]] = field(default_factory=list)
    n_text: int = 0  # TTS tokens of seg_text (upstream `tts_token_lens`)
    seed_text: str = ""  # the start of seg_text that the segment was seeded with (after a roll-over)
    chunk_idx: int = 0  # text chunks prefilled in this segment
    segment: int = 0
    closing: bool = False  # the segment ends at its text: finish it, then roll over
    text_done: bool = False  # the caller finished the text
    tail_prefilled: bool = False  # the segment's remaining text is prefilled (final phase)
    done: bool = False
    codes: list[torch.Tensor] = field(default_factory=list)  # every generated frame of the utterance, no seeds


class SpeechDecoder:
    """ConditionalChatTTS (+ DVAE and Vocos when `vocoder` is given) speaking many utterances, each in a KV slot."""

    def __init__(self, cfg: TTSConfig, text: ChatTTSText, model: ConditionalChatTTS, vocoder: WaveDecoder | None,
                 max_utterances: int = MAX_UTTERANCES):
        self.cfg, self.text, self.model, self.vocoder = cfg, text, model, vocoder
        self.device = model.emb_text.weight.device
        self.generator = CodeGenerator(model, CodeSampler(cfg, model.eos_id), max_utterances)
        self.chunk_tokens = cfg.streaming_text_chunk_size
        self.n_start = text.n_start
        self.close_after = cfg.streaming_text_reserved_len - SEGMENT_SHIFT

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, vocoder: bool = True, progress: bool = False,
                        max_utterances: int = MAX_UTTERANCES) -> SpeechDecoder:
        """Loads `tts.` (and the DVAE + Vocos unless `vocoder` is False) and the ChatTTS tokenizer."""
        device = torch.device(device)
        cfg = ModelConfig.from_model_dir(model_dir).tts
        model = load_tts(CheckpointReader(model_dir), cfg, device, dtype, progress)
        wave = WaveDecoder.from_checkpoint(model_dir, device, dtype) if vocoder else None
        return cls(cfg, ChatTTSText(model_dir, cfg), model, wave, max_utterances)

    # -- public API ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def start(self, spk_hidden: torch.Tensor, greedy: bool = False, seed: int | None = None,
              with_audio: bool = True) -> UtteranceState:
        """A new utterance spoken with the voice of the LLM's `<|spk|>` hidden state (llm_hidden,); it takes a KV
        slot (`KVPoolFullError` when all are busy) until it is done or released. `with_audio=False`: codes only,
        this utterance never runs the vocoder."""
        spk = torch.as_tensor(spk_hidden)
        if spk.dim() == 2 and spk.shape[0] == 1:
            spk = spk[0]
        if spk.dim() != 1 or spk.shape[0] != self.cfg.llm_dim:
            raise SpeakerEmbeddingError(
                f"speaker hidden state has shape {tuple(spk.shape)}; expected ({self.cfg.llm_dim},), the LLM hidden "
                "state at the <|spk|> token")
        if not bool(torch.isfinite(spk).all()):
            raise SpeakerEmbeddingError("speaker hidden state holds NaN or infinite values")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        spk_emb = self.model.speaker_embedding(spk[None].to(self.device))
        seg = self.generator.open(self.text.text_mask(0), greedy, generator)
        return UtteranceState(spk_emb=spk_emb, seg=seg, vocoder=self.vocoder.new_stream() if self.vocoder and with_audio else None)

    def release(self, state: UtteranceState) -> None:
        """End an utterance now (finished, cancelled or abandoned) and give its KV slot back."""
        state.done = True
        self.generator.close(state.seg)

    def push_text(self, state: UtteranceState, text_delta: str) -> list[SpeechChunk]:
        """Add a piece of text; returns the audio chunks it makes ready (possibly none)."""
        self.feed(state, text_delta)
        return self.run(state)

    def finish(self, state: UtteranceState) -> list[SpeechChunk]:
        """End of the text: speak the rest, generate to eos (or the code cap), emit everything left."""
        self.end_text(state)
        return self.run(state)

    def feed(self, state: UtteranceState, text_delta: str) -> None:
        """Record a text piece without running the model (the caller batches work with `step_many`)."""
        if state.text_done:
            raise TTSInputError("text pushed after finish() for this utterance")
        piece = text_delta.split(TTS_EOS_TEXT)[0]
        state.raw_text += piece
        state.pieces += 1
        if state.pieces <= 2:
            state.language = detect_language(state.raw_text)
        norm = normalize(piece, state.language or "english")
        if state.done:
            return
        if state.closing:
            state.pending.append((norm, piece))
            return
        self._extend_segment(state, norm, piece)

    def end_text(self, state: UtteranceState) -> None:
        if state.text_done or state.done:
            state.text_done = True
            return
        if self._nothing_new(state) and state.segment == 0:
            raise EmptyTextError("no text to speak: the utterance received only empty or whitespace text")
        state.text_done = True
        if self._nothing_new(state):  # a new segment got no text after its seed: upstream stops there too
            self.release(state)

    def has_work(self, state: UtteranceState) -> bool:
        if state.done:
            return False
        if state.closing or state.text_done:
            return True
        return state.n_text >= (state.chunk_idx + 1) * self.chunk_tokens

    def run(self, state: UtteranceState) -> list[SpeechChunk]:
        chunks: list[SpeechChunk] = []
        while self.has_work(state):
            chunks += self.step_many([state])[0]
        return chunks

    @torch.inference_mode()
    def step_many(self, states: list[UtteranceState]) -> list[list[SpeechChunk]]:
        """Advance every state with work by one chunk (prefill + up to 25 codes, batched across states)."""
        ready = [s for s in states if self.has_work(s)]
        prefills = [(s.seg, p) for s in ready if (p := self._next_prefill(s)) is not None]
        self.generator.prefill_text(prefills)
        new = self.generator.generate([s.seg for s in ready], CODES_PER_CHUNK)
        made: dict[int, SpeechChunk] = {}
        rolled: list[UtteranceState] = []
        for s, frames in zip(ready, new):
            codes = torch.stack(frames) if frames else torch.zeros(0, self.cfg.num_vq, dtype=torch.long)
            s.codes += frames
            final_phase = s.closing or s.text_done
            over_cap = len(s.seg.codes) > MAX_SEGMENT_CODES
            segment_over = s.seg.finished or (final_phase and over_cap)
            text, s.text_reported = s.raw_text[s.text_reported :], len(s.raw_text)
            made[id(s)] = SpeechChunk(codes=codes, audio=None, text=text, end_of_segment=segment_over)
            if segment_over:
                # Roll over only after eos of a closing segment; upstream ends the utterance at the code cap.
                if s.closing and s.seg.finished:
                    rolled.append(s)
                else:
                    self.release(s)
        self._roll_over(rolled)
        spoken = [s for s in ready if s.vocoder is not None]
        if spoken:
            audio = self.vocoder.push_many([s.vocoder for s in spoken], [made[id(s)].codes for s in spoken],
                                           [made[id(s)].end_of_segment for s in spoken])
            for s, a in zip(spoken, audio):
                made[id(s)].audio = a
        return [[made[id(s)]] if id(s) in made else [] for s in states]

    @torch.inference_mode()
    def synthesize(self, spk_hidden: torch.Tensor, text: str, greedy: bool = False,
                   seed: int | None = None) -> tuple[torch.Tensor, np.ndarray | None]:
        """Non-streaming synthesis as upstream `_generate_mel_spec` (chat path: no text normalisation).

        All 303 condition slots are prefilled chunk by chunk (10 per 25 codes), then generation runs to eos or
        the code cap; one DVAE + Vocos pass. Returns codes (T, num_vq) and the audio (None without vocoder).
        """
        if not text.strip():
            raise EmptyTextError("no text to speak")
        layout = self.text.layout(text)
        state = self.start(spk_hidden, greedy=greedy, seed=seed)
        seg = state.seg
        seg.text_mask = self.text.text_mask(layout.n_text)
        ids = torch.tensor(layout.ids)
        try:
            for chunk in range(math.ceil(self.model.condition_length / self.chunk_tokens)):
                prefill = self._prefill(state, ids, *self._chunk_bounds(chunk))
                self.generator.prefill_text([(seg, prefill)] if prefill else [])
                state.codes += self.generator.generate([seg], CODES_PER_CHUNK)[0]
                if seg.finished:
                    break
            while not seg.finished and len(seg.codes) <= MAX_SEGMENT_CODES:
                state.codes += self.generator.generate([seg], CODES_PER_CHUNK)[0]
        finally:
            self.release(state)
        codes = torch.stack(state.codes)
        audio = self.vocoder.decode(codes) if self.vocoder is not None else None
        return codes, audio

    # -- segments --------------------------------------------------------------------------------------------
    def _extend_segment(self, s: UtteranceState, norm: str, raw: str | None) -> None:
        """Add a normalised piece to the open segment, or close the segment at its end (upstream: a sentence end
        in the piece once 120 tokens are there; here also before the 300 reserved slots would overflow)."""
        candidate = s.seg_text + norm
        n = self.text.count(candidate)
        limit = self.text.max_text_tokens
        cut = None
        mark = sentence_end(raw) if raw is not None and n >= self.close_after else ""
        if mark:
            cut = candidate.rfind(mark) + 1
            if self.text.count(candidate[:cut]) > limit:
                cut = None
        if cut is None and n > limit:
            cut = self.text.cut(candidate, limit, self.close_after, after=len(s.seed_text))
        if cut is None:
            s.seg_text, s.n_text = candidate, n
            return
        s.seg_text, s.n_text, s.closing = candidate[:cut], self.text.count(candidate[:cut]), True
        if candidate[cut:]:
            s.pending.insert(0, (candidate[cut:], None))

    def _roll_over(self, states: list[UtteranceState]) -> None:
        """Start each state's next segment in the same KV slot, seeded with the last 5 text tokens and the last 50
        codes (upstream recursion); the text that waited is then taken piece by piece (it may close it again)."""
        heads = []
        for s in states:
            text_ids = self.text.layout(s.seg_text).ids
            seed_text = text_ids[self.n_start + s.n_text - SEED_TEXT_TOKENS : self.n_start + s.n_text]
            s.segment += 1
            s.seg_text = s.seed_text = self.text.decode(seed_text)
            s.n_text = self.text.count(s.seg_text)
            s.closing, s.tail_prefilled, s.chunk_idx = False, False, 0
            waiting, s.pending = s.pending, []
            for i, (norm, raw) in enumerate(waiting):
                self._extend_segment(s, norm, raw)
                if s.closing:
                    s.pending += waiting[i + 1 :]
                    break
            if s.text_done and self._nothing_new(s):
                self.release(s)
                continue
            self.generator.restart(s.seg, self.text.text_mask(len(seed_text)), s.seg.codes[-SEED_CODES:])
            heads.append((s.seg, TextPrefill(torch.tensor(self.text.start_ids() + seed_text), 0, s.spk_emb)))
        self.generator.prefill_text(heads)
        # The last seed code is not prefilled: it is the input of the next generation step.
        self.generator.prefill_audio([seg for seg, _ in heads])

    def _nothing_new(self, s: UtteranceState) -> bool:
        """The open segment holds no text beyond its seed (none at all for the first segment)."""
        return not s.closing and s.n_text == self.text.count(s.seed_text)

    # -- prefill schedule ------------------------------------------------------------------------------------
    def _chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """Condition slots of text chunk `chunk`: chunk 0 also holds [Stts][spk_emb]."""
        if chunk == 0:
            return 0, self.chunk_tokens + self.n_start
        begin = chunk * self.chunk_tokens + self.n_start
        return begin, min(begin + self.chunk_tokens, self.model.condition_length - 1)

    def _next_prefill(self, s: UtteranceState) -> TextPrefill | None:
        """What the next chunk of generation may see and is not prefilled yet: the next 10 text tokens, or in the
        final phase everything left up to and including [Etts]."""
        ids = torch.tensor(self.text.layout(s.seg_text).ids)
        s.seg.text_mask = self.text.text_mask(s.n_text)
        if s.closing or s.text_done:
            if s.tail_prefilled:
                return None
            begin = 0 if s.chunk_idx == 0 else self._chunk_bounds(s.chunk_idx)[0]
            end = self.n_start + s.n_text + 1
            s.tail_prefilled = True
        else:
            begin, end = self._chunk_bounds(s.chunk_idx)
            s.chunk_idx += 1
        return self._prefill(s, ids, begin, end)

    @staticmethod
    def _prefill(s: UtteranceState, ids: torch.Tensor, begin: int, end: int) -> TextPrefill | None:
        """Condition slots begin..end of `ids`; the chunk at slot 0 carries the speaker embedding."""
        if end <= begin:
            return None
        return TextPrefill(ids[begin:end], begin, s.spk_emb if begin == 0 else None)


@dataclass(eq=False)
class _Job:
    state: UtteranceState
    text: str | None  # a text piece to feed, or None
    end: bool  # finish the text
    future: asyncio.Future
    fed: bool = False
    error: TTSInputError | None = None
    chunks: list[SpeechChunk] = field(default_factory=list)


class StepBatcher:
    """asyncio front of a `SpeechDecoder` that batches the chunk steps of every utterance on the replica.

    `push_text`/`finish` may be awaited concurrently for many utterances; one worker runs, in one thread at a
    time, the pending text feeds and then `step_many` over every utterance with work, until each call's
    utterance is idle again, and resolves each call with the chunks its utterance produced. All tokenizer and
    model use after `start` happens in that worker (the fast tokenizer is not thread-safe), and a forgotten
    utterance gives its KV slot back only between two of its steps. Calls for one utterance are served in order.
    """

    def __init__(self, decoder: SpeechDecoder):
        self.decoder = decoder
        self._jobs: list[_Job] = []
        self._locks: dict[int, asyncio.Lock] = {}
        self._worker: asyncio.Task | None = None
        self._forgotten: list[UtteranceState] = []
        self.max_batch = 0  # most utterances advanced by one step_many (observability)

    async def push_text(self, state: UtteranceState, text_delta: str) -> list[SpeechChunk]:
        return await self._submit(state, text_delta, end=False)

    async def finish(self, state: UtteranceState) -> list[SpeechChunk]:
        try:
            return await self._submit(state, None, end=True)
        finally:
            self.forget(state)

    def forget(self, state: UtteranceState) -> None:
        """End an utterance's part here (after finish(), or instead of it when cancelled): its bookkeeping, and its
        KV slot once no step uses it (a call still waiting for it then returns what it has)."""
        self._locks.pop(id(state), None)
        if self._worker is not None and not self._worker.done():
            self._forgotten.append(state)  # the worker thread may be stepping it: released between two ticks
        else:
            self.decoder.release(state)

    async def _submit(self, state: UtteranceState, text: str | None, end: bool) -> list[SpeechChunk]:
        lock = self._locks.setdefault(id(state), asyncio.Lock())
        async with lock:
            job = _Job(state, text, end, asyncio.get_running_loop().create_future())
            self._jobs.append(job)
            if self._worker is None or self._worker.done():
                self._worker = asyncio.create_task(self._run())
            return await job.future

    async def _run(self) -> None:
        while self._jobs:
            jobs = list(self._jobs)
            try:
                await asyncio.to_thread(self._tick, jobs)
            except Exception as exc:  # a model failure fails every call in the batch; the worker goes on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
            for state in self._forgotten:
                self.decoder.release(state)
            self._forgotten.clear()
            for job in jobs:
                if job.error is not None and not job.future.done():
                    job.future.set_exception(job.error)
                if job.future.done() or not self.decoder.has_work(job.state):
                    self._jobs.remove(job)
                    if not job.future.done():
                        job.future.set_result(job.chunks)

    def _tick(self, jobs: list[_Job]) -> None:
        """Worker thread: feed new text (input errors fail only their call), then one batched step."""
        for job in jobs:
            if job.fed:
                continue
            job.fed = True
            try:
                if job.text is not None:
                    self.decoder.feed(job.state, job.text)
                if job.end:
                    self.decoder.end_text(job.state)
            except TTSInputError as exc:
                job.error = exc
        live = [j for j in jobs if j.error is None and not j.future.done() and self.decoder.has_work(j.state)]
        if not live:
            return
        self.max_batch = max(self.max_batch, len(live))
        for job, chunks in zip(live, self.decoder.step_many([j.state for j in live])):
            job.chunks += chunks

