"""Streaming speech decoder: chunk timing, exact cross-fade at every join, streaming == non-streaming codes,
batched utterances == solo ones (greedy and seeded, idle slots in between), segment roll-over at sentence ends and
of over-long unpunctuated text, KV slots given back, and clear errors for bad input. Runs on the golden (tiny)
checkpoint."""

from __future__ import annotations

import asyncio
import itertools
import math

import numpy as np
import pytest
import torch

from services.tts_decoder.kv_pool import KVPoolFullError
from services.tts_decoder.sampler import MIN_NEW_TOKENS
from services.tts_decoder.streaming import SEED_TEXT_TOKENS, SpeakerEmbeddingError, StepBatcher, SpeechDecoder
from services.tts_decoder.text import EmptyTextError, TTSInputError
from services.tts_decoder.vocoder import CROSSFADE_SAMPLES, OVERLAP_CODES

WORDS = "hello world, this is a voice test of the streaming decoder with several words in it".split()


@pytest.fixture(scope="module")
def decoder(golden):
    return SpeechDecoder.from_checkpoint(golden.checkpoint, vocoder=True)


@pytest.fixture(scope="module")
def codes_only(golden):
    return SpeechDecoder.from_checkpoint(golden.checkpoint, vocoder=False)


def speaker(dim: int, seed: int) -> torch.Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


def upstream_overlap_add(frames: list[torch.Tensor], overlap: int) -> torch.Tensor:
    """The reference stream: upstream `_linear_overlap_add2_wav` applied chunk after chunk, tail un-smoothed."""
    out, prev = [], None
    for wav in frames:
        if prev is None:
            prev = wav
            continue
        total = prev.shape[0] + wav.shape[0] - overlap
        weight_len = max(prev.shape[0], wav.shape[0]) + overlap
        t = torch.linspace(0, 1, weight_len + 2, dtype=torch.float32)[1:-1]
        weight = 0.5 - (t - 0.5).abs()
        acc, norm = torch.zeros(total), torch.zeros(total)
        acc[: prev.shape[0]] += weight[-prev.shape[0] :] * prev
        norm[: prev.shape[0]] += weight[-prev.shape[0] :]
        off = prev.shape[0] - overlap
        acc[off : off + wav.shape[0]] += weight[: wav.shape[0]] * wav
        norm[off : off + wav.shape[0]] += weight[: wav.shape[0]]
        joined = acc / norm
        out.append(joined[: prev.shape[0]])
        prev = joined[prev.shape[0] :]
    out.append(prev)
    return torch.cat(out)


def per_chunk_vocoder_outputs(decoder: SpeechDecoder, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """What upstream vocodes per chunk: the chunk's codes plus the 4 codes before them."""
    history = torch.cat(chunks)
    frames, start = [], 0
    for c in chunks:
        window = history[max(start - OVERLAP_CODES, 0) : start + c.shape[0]]
        frames.append(decoder.vocoder.mel_to_audio(decoder.vocoder.mel(window))[0].cpu())
        start += c.shape[0]
    return frames


def test_first_chunk_after_first_ten_text_tokens(decoder):
    state = decoder.start(speaker(decoder.cfg.llm_dim, 0), greedy=True)
    text, first_at = "", None
    for i, word in enumerate(WORDS):
        text += word + " "
        chunks = decoder.push_text(state, word + " ")
        if chunks:
            first_at = i
            assert chunks[0].codes.shape == (25, decoder.cfg.num_vq)
            assert chunks[0].audio is not None and chunks[0].audio.size > 0
            assert chunks[0].text == text
            break
    assert first_at is not None, "no audio before the end of the text"
    # The chunk comes exactly with the piece that brought the 10th TTS text token.
    assert decoder.text.count(" ".join(WORDS[: first_at + 1])) >= 10
    assert decoder.text.count(" ".join(WORDS[:first_at])) < 10
    decoder.finish(state)


def test_vocoder_crossfade_exact_at_every_join(decoder):
    gen = torch.Generator().manual_seed(1)
    chunks = [torch.randint(0, 625, (n, 4), generator=gen) for n in (25, 25, 25, 12)]
    stream = decoder.vocoder.new_stream()
    emitted = [decoder.vocoder.push(stream, c, flush=i == len(chunks) - 1) for i, c in enumerate(chunks)]
    # Audio is released as soon as each chunk is decoded: all but the held cross-fade tail.
    assert emitted[0].shape[0] == chunks[0].shape[0] * 512 - CROSSFADE_SAMPLES
    expected = upstream_overlap_add(per_chunk_vocoder_outputs(decoder, chunks), CROSSFADE_SAMPLES)
    got = torch.from_numpy(np.concatenate(emitted))
    assert got.shape == expected.shape
    # Upstream divides every sample by its weight sum (x*w/w), which may move untouched samples by an ulp.
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_streaming_audio_is_the_crossfaded_stream_of_its_codes(decoder):
    state = decoder.start(speaker(decoder.cfg.llm_dim, 0), greedy=True)
    chunks = []
    for word in WORDS:
        chunks += decoder.push_text(state, word + " ")
    chunks += decoder.finish(state)
    assert len(chunks) >= 2 and chunks[-1].end_of_segment
    frames = per_chunk_vocoder_outputs(decoder, [c.codes for c in chunks if c.codes.shape[0]])
    expected = upstream_overlap_add(frames, CROSSFADE_SAMPLES)
    got = torch.from_numpy(np.concatenate([c.audio for c in chunks]))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert (" ".join(WORDS) + " ").startswith("".join(c.text for c in chunks))


def test_streaming_codes_equal_non_streaming_greedy(codes_only):
    spk = speaker(codes_only.cfg.llm_dim, 2)
    state = codes_only.start(spk, greedy=True)
    chunks = []
    for word in WORDS:
        chunks += codes_only.push_text(state, word + " ")
    chunks += codes_only.finish(state)
    assert all(c.audio is None for c in chunks)
    streamed = torch.cat([c.codes for c in chunks])
    offline, audio = codes_only.synthesize(spk, " ".join(WORDS) + " ", greedy=True)
    assert audio is None
    assert torch.equal(streamed, offline)


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "seeded"])
def test_step_many_equals_solo(codes_only, greedy):
    """Batched steps give each utterance its solo codes, also with an idle utterance's slot inside the batch's
    span and with sampling (each utterance draws from its own seeded generator)."""
    texts = [WORDS, WORDS[3:], WORDS[::-1]]

    def run(batched: bool) -> list[torch.Tensor]:
        states = []
        for i in range(3):
            states.append(codes_only.start(speaker(codes_only.cfg.llm_dim, 10 + i), greedy=greedy, seed=40 + i))
            if batched and i == 0:  # holds the slot between the first two: an idle row in every batched step
                idle = codes_only.start(speaker(codes_only.cfg.llm_dim, 9))
        for i, words in enumerate(texts):
            for w in words:
                codes_only.feed(states[i], w + " ")
            codes_only.end_text(states[i])
        if batched:
            assert states[1].seg.slot - states[0].seg.slot == 2
            while any(codes_only.has_work(s) for s in states):
                codes_only.step_many(states)
            codes_only.release(idle)
        else:
            for s in states:
                codes_only.run(s)
        return [torch.stack(s.codes) for s in states]

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


def test_codes_only_utterance_skips_the_vocoder_beside_a_spoken_one(decoder):
    """One batched step over a spoken and a codes-only utterance: the codes-only one gets no audio (its chunks
    never reach DVAE + Vocos) and both keep the codes they get alone."""
    def speak(with_audio: list[bool]) -> list[list]:
        states = [decoder.start(speaker(decoder.cfg.llm_dim, 3), greedy=True, with_audio=a) for a in with_audio]
        for s in states:
            for w in WORDS:
                decoder.feed(s, w + " ")
            decoder.end_text(s)
        chunks: list[list] = [[] for _ in states]
        while any(decoder.has_work(s) for s in states):
            for out, made in zip(chunks, decoder.step_many(states)):
                out += made
        return chunks

    spoken, silent = speak([True, False])
    assert all(c.audio is not None for c in spoken) and all(c.audio is None for c in silent)
    alone = speak([True])[0]
    for chunks in (spoken, silent):
        assert torch.equal(torch.cat([c.codes for c in chunks]), torch.cat([c.codes for c in alone]))


def test_sampling_is_reproducible_with_a_seed(codes_only):
    def run() -> torch.Tensor:
        state = codes_only.start(speaker(codes_only.cfg.llm_dim, 3), seed=7)
        chunks = codes_only.push_text(state, " ".join(WORDS[:8]))
        return torch.cat([c.codes for c in chunks + codes_only.finish(state)])

    assert torch.equal(run(), run())


class EosWhileClosing:
    """Sampling step that ends a closing segment as soon as upstream allows (after 10 steps of a call)."""

    def __init__(self, sampler, state):
        self.sampler, self.state = sampler, state

    def __call__(self, logits, step_in_call, bos, greedy, generators):
        codes = self.sampler(logits, step_in_call, bos, greedy, generators)
        if self.state.closing and step_in_call >= MIN_NEW_TOKENS:
            return torch.full_like(codes, self.sampler.eos_id)
        return codes


class EosOnlyWhenClosing(EosWhileClosing):
    """As `EosWhileClosing`, and the model never picks eos itself; records each closing segment's text."""

    def __init__(self, sampler, state):
        super().__init__(sampler, state)
        self.closed: list[tuple[str, int]] = []  # (segment text, its TTS tokens)

    def __call__(self, logits, step_in_call, bos, greedy, generators):
        logits = logits.clone()
        logits[..., self.sampler.eos_id] = -torch.inf
        codes = super().__call__(logits, step_in_call, bos, greedy, generators)
        if bool((codes == self.sampler.eos_id).any()):
            self.closed.append((self.state.seg_text, self.state.n_text))
        return codes


def test_long_text_rolls_over_to_a_new_segment(golden):
    """Past 120 TTS tokens a sentence end closes the segment; once it reaches eos the utterance continues in a
    new segment seeded with the last 5 text tokens and last 50 codes. eos is forced once the segment closes
    (random weights would otherwise decide when it comes)."""
    dec = SpeechDecoder.from_checkpoint(golden.checkpoint, vocoder=False)
    eos = dec.model.eos_id
    with torch.no_grad():  # make eos unreachable until the segment closes
        dec.model.head_logits(torch.zeros(1, dec.cfg.hidden_size))
        saved = dec.model._head_weight.clone()
        dec.model._head_weight.view(dec.cfg.num_vq, -1, dec.cfg.hidden_size)[:, eos] = 0
    state = dec.start(speaker(dec.cfg.llm_dim, 4), greedy=True)
    sentence = "this is a fairly long sentence that keeps going with many words in it. "
    chunks = []
    while not state.closing:
        for w in sentence.split(" "):
            dec.feed(state, w + " ")
            if state.closing:
                break
            chunks += dec.run(state)
    assert state.n_text >= dec.cfg.streaming_text_reserved_len - 180
    closed_text_ids = dec.text.layout(state.seg_text).ids[dec.n_start : dec.n_start + state.n_text]
    dec.model._head_weight.copy_(saved)
    dec.generator.sampler = EosWhileClosing(dec.generator.sampler, state)
    chunks += dec.push_text(state, "and then the answer goes on after the break")
    assert state.segment == 1
    assert [c.end_of_segment for c in chunks].count(True) == (2 if state.done else 1)
    first_end = [c.end_of_segment for c in chunks].index(True)
    segment0 = torch.cat([c.codes for c in chunks[: first_end + 1]])
    assert torch.equal(torch.stack(state.seg.codes[:50]), segment0[-50:])
    assert state.seg_text.startswith(dec.text.decode(closed_text_ids[-5:]))
    assert state.seg_text.endswith("and then the answer goes on after the break")
    chunks += dec.finish(state)
    assert state.done and chunks[-1].end_of_segment
    assert [c.end_of_segment for c in chunks].count(True) == 2
    assert torch.equal(torch.cat([c.codes for c in chunks]), torch.stack(state.codes))


def test_bad_inputs_have_clear_errors(codes_only):
    dim = codes_only.cfg.llm_dim
    with pytest.raises(SpeakerEmbeddingError, match=str(dim)):
        codes_only.start(torch.zeros(dim + 1))
    with pytest.raises(SpeakerEmbeddingError, match="NaN"):
        codes_only.start(torch.full((dim,), float("nan")))
    state = codes_only.start(speaker(dim, 5))
    codes_only.push_text(state, "   ")
    with pytest.raises(EmptyTextError):
        codes_only.finish(state)
    state = codes_only.start(speaker(dim, 5))
    codes_only.feed(state, "short text.")
    codes_only.end_text(state)
    with pytest.raises(TTSInputError, match="after finish"):
        codes_only.feed(state, "more")
    with pytest.raises(EmptyTextError):
        codes_only.synthesize(speaker(dim, 5), " ")
    codes_only.release(state)


STORY = ("the sea was calm and the small boat went on and on under a grey sky while the old man told a story about "
         "the waves and the wind and the long nights").split()
STORY_PIECES = [" ".join(STORY[j % len(STORY)] for j in range(i, i + 3)) + " " for i in range(0, 700, 3)]
UNBROKEN_PIECES = ["and then he said ", *["你好你好你好"] * 110]  # then no space at all: cuts at the token limit


@pytest.mark.parametrize("pieces", [STORY_PIECES, UNBROKEN_PIECES], ids=["1000-words", "no-spaces"])
def test_long_unpunctuated_text_is_spoken_whole_in_rolled_over_segments(golden, pieces):
    """Long text without a single punctuation mark (1000+ TTS tokens of words; 600+ of characters without spaces),
    pushed a few words at a time: no error, every segment is cut before the 300 reserved slots overflow and rolls
    over (seeded with its last 5 text tokens), and the segments' new texts add up to the whole text."""
    dec = SpeechDecoder.from_checkpoint(golden.checkpoint, vocoder=False)
    state = dec.start(speaker(dec.cfg.llm_dim, 8), greedy=True)
    dec.generator.sampler = sampler = EosOnlyWhenClosing(dec.generator.sampler, state)
    text = "".join(pieces)
    n_text = dec.text.count(text)
    assert n_text > (1000 if pieces is STORY_PIECES else 600)
    chunks = []
    for piece in pieces:
        chunks += dec.push_text(state, piece)
    chunks += dec.finish(state)
    assert state.done and not state.pending
    segments = sampler.closed + [(state.seg_text, state.n_text)]
    assert len(segments) == state.segment + 1 >= math.ceil(n_text / dec.text.max_text_tokens)
    assert [c.end_of_segment for c in chunks].count(True) == len(segments)
    spoken = segments[0][0]
    for (prev, n_prev), (seg, _) in itertools.pairwise(segments):
        assert n_prev <= dec.text.max_text_tokens
        seed_ids = dec.text.layout(prev).ids[dec.n_start + n_prev - SEED_TEXT_TOKENS : dec.n_start + n_prev]
        seed = dec.text.decode(seed_ids)
        assert seg.startswith(seed) and len(seg) > len(seed)
        spoken += seg[len(seed) :]
    assert spoken == text
    assert torch.equal(torch.cat([c.codes for c in chunks]), torch.stack(state.codes))


def test_utterances_give_their_kv_slots_back(golden):
    dec = SpeechDecoder.from_checkpoint(golden.checkpoint, vocoder=False, max_utterances=2)
    pool = dec.generator.pool
    spk = speaker(dec.cfg.llm_dim, 11)
    finished, cancelled = dec.start(spk, greedy=True), dec.start(spk, greedy=True)
    with pytest.raises(KVPoolFullError):
        dec.start(spk)
    dec.push_text(finished, " ".join(WORDS[:6]))
    dec.finish(finished)  # done: its slot is free again
    assert pool.in_use == 1
    dec.push_text(cancelled, " ".join(WORDS[:6]))
    dec.release(cancelled)
    assert pool.in_use == 0 and not dec.has_work(cancelled)

    async def cancel_mid_step() -> list:
        batcher = StepBatcher(dec)
        state = dec.start(spk, greedy=True)
        call = asyncio.create_task(batcher.push_text(state, " ".join(WORDS)))
        await asyncio.sleep(0)  # the call is queued and the worker started
        batcher.forget(state)  # while the worker may be stepping it: released between two ticks
        assert pool.in_use == 1
        chunks = await call
        assert pool.in_use == 0
        return chunks

    assert isinstance(asyncio.run(cancel_mid_step()), list)


def test_runs_in_bfloat16(golden):
    """The GPU dtype path (bf16 weights, KV and masks; float32 sampling, FSQ and ISTFT) works end to end."""
    dec = SpeechDecoder.from_checkpoint(golden.checkpoint, dtype=torch.bfloat16)
    state = dec.start(speaker(dec.cfg.llm_dim, 6), seed=0)
    chunks = dec.push_text(state, " ".join(WORDS[:8])) + dec.finish(state)
    assert chunks and chunks[-1].end_of_segment
    audio = np.concatenate([c.audio for c in chunks])
    assert audio.dtype == np.float32 and np.isfinite(audio).all()
    assert audio.shape[0] == sum(c.codes.shape[0] for c in chunks) * 512


def test_step_batcher_batches_concurrent_utterances(codes_only):
    """Concurrent async calls for several utterances share step_many and give the solo results."""
    texts = [WORDS, WORDS[2:], WORDS[::-1]]

    async def speak(batcher: StepBatcher, i: int) -> torch.Tensor:
        state = codes_only.start(speaker(codes_only.cfg.llm_dim, 20 + i), greedy=True)
        chunks = []
        for w in texts[i]:
            chunks += await batcher.push_text(state, w + " ")
        chunks += await batcher.finish(state)
        return torch.cat([c.codes for c in chunks])

    async def all_together() -> list[torch.Tensor]:
        batcher = StepBatcher(codes_only)
        results = await asyncio.gather(*(speak(batcher, i) for i in range(3)))
        assert batcher.max_batch > 1
        return results

    async def bad_input() -> None:
        batcher = StepBatcher(codes_only)
        state = codes_only.start(speaker(codes_only.cfg.llm_dim, 1))
        with pytest.raises(EmptyTextError):
            await batcher.finish(state)

    together = asyncio.run(all_together())
    solo = [asyncio.run(speak(StepBatcher(codes_only), i)) for i in range(3)]
    for a, b in zip(together, solo):
        assert torch.equal(a, b)
    asyncio.run(bad_input())


def test_vocoder_segment_end_flushes_and_restarts_the_crossfade(decoder):
    """At a segment end the held tail goes out un-smoothed; the next segment starts a new cross-fade chain while
    its first chunk is still decoded with the 4 codes before it (they are the previous segment's last codes)."""
    gen = torch.Generator().manual_seed(2)
    sizes, flushes = (25, 25, 12, 25, 14), (False, False, True, False, True)
    chunks = [torch.randint(0, 625, (n, 4), generator=gen) for n in sizes]
    stream = decoder.vocoder.new_stream()
    got = torch.from_numpy(np.concatenate([decoder.vocoder.push(stream, c, f) for c, f in zip(chunks, flushes)]))
    frames = per_chunk_vocoder_outputs(decoder, chunks)
    expected = torch.cat([upstream_overlap_add(frames[:3], CROSSFADE_SAMPLES),
                          upstream_overlap_add(frames[3:], CROSSFADE_SAMPLES)])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
