"""`minicpmo bench tts`: streaming speech synthesis on one replica: concurrent utterances, a whole spoken answer,
and the vocoder's batching.

Rows of workload "chunks": 1, 4 and 16 concurrent utterances; per utterance a text of `chunks` x 10 TTS tokens
arrives at once (the LLM is faster than the TTS), and the decoder emits `chunks` audio chunks of 25 codes (~0.53 s
each) through `step_many`, which batches the generation steps of all utterances and vocodes equal-length chunks
together. Sampling runs with upstream settings and a seed; eos is disabled (upstream's `force_no_stop`) so every
run does the same work regardless of the random weights.

- ttfa_ms: time to first audio, mean over utterances (from the moment all texts are there).
- rtf: wall time / audio seconds of one utterance (< 1: each stream is faster than real time); cpu_rtf: the same
  with process CPU time (the steadier number on a shared machine).
- chunks_per_s: audio chunks emitted per second, all utterances together.
- audio_s_per_s: seconds of audio produced per wall second, all utterances together.
- batching_speedup: N x (wall time of 1 utterance) / (wall time of N together), i.e. the gain of `step_many`
  over serving the N utterances one after another.

Row of workload "answer": one whole spoken answer as the LLM streams it (a 3-word text piece per push, then
finish), eos disabled, so after the text the final phase runs to the 2048-code cap: 43.7 s of audio.

Rows of workload "vocoder": one 25-code chunk (decoded with the 4 codes before it, as in streaming) for each of N
utterances, `WaveDecoder.push_many` over all of them vs one `push` per utterance (batching_speedup).

Configs: "tiny" = the golden checkpoint (else a generated tiny one); "small" = `small_config()` with random
weights (real depth and head dims, 1/8 widths; DVAE and Vocos at their fixed official size). fp32 on CPU, bf16 on
CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from services.common.bench import timed
from services.common.bench_checkpoints import tiny_checkpoint
from services.common.config import small_config
from services.tts_decoder.dvae import DVAE
from services.tts_decoder.generation import CODES_PER_CHUNK
from services.tts_decoder.model import build_tts
from services.tts_decoder.streaming import SpeechDecoder
from services.tts_decoder.text import ChatTTSText
from services.tts_decoder.vocoder import (
    CROSSFADE_SAMPLES,
    OVERLAP_CODES,
    SAMPLE_RATE,
    VocoderStream,
    WaveDecoder,
    build_vocos,
)

CONCURRENCY = (1, 4, 16)
ANSWER = ("Sure, here is a short answer. The quick brown fox jumps over the lazy dog while a calm voice reads this "
          "sentence aloud, and then it keeps going with more plain words so that the answer has enough text to speak "
          "for a while.")
WORDS = ("the quick brown fox jumps over the lazy dog while a calm voice reads this sentence aloud for the "
         "benchmark and keeps going with more plain words so that every utterance has enough text").split()


def build_decoder(config: str, device: str, dtype: torch.dtype) -> SpeechDecoder:
    tiny = tiny_checkpoint()
    if config == "tiny":
        dec = SpeechDecoder.from_checkpoint(tiny, device=device, dtype=dtype)
    elif config == "small":
        # Random weights; the tokenizer is the tiny checkpoint's (its ids fit the small text vocabulary), so the
        # special ids the model looks for come from it.
        text = ChatTTSText(tiny, small_config().tts)
        ids = text.tokenizer.convert_tokens_to_ids(["[spk_emb]", "[Ptts]", "[Etts]"])
        cfg = dataclasses.replace(small_config().tts, spk_emb_token_id=ids[0], audio_bos_token_id=ids[1],
                                  text_eos_token_id=ids[2])
        torch.manual_seed(0)
        model = build_tts(cfg, device).to(dtype).eval()
        with torch.device(device):
            dvae = DVAE()
        vocoder = WaveDecoder(dvae, build_vocos(), device, dtype)
        dec = SpeechDecoder(cfg, ChatTTSText(tiny, cfg), model, vocoder)
    else:
        raise ValueError(f"unknown config {config!r} (tiny, small)")
    dec.generator.sampler.force_no_stop = True
    return dec


def text_of(dec: SpeechDecoder, n_tokens: int) -> str:
    """The shortest prefix of WORDS with at least `n_tokens` TTS tokens."""
    for k in range(1, len(WORDS) + 1):
        text = " ".join(WORDS[:k])
        if dec.text.count(text) >= n_tokens:
            return text
    raise ValueError(f"benchmark text has fewer than {n_tokens} TTS tokens")


def run_once(dec: SpeechDecoder, n: int, text: str, chunks: int) -> dict:
    spk = torch.randn(n, dec.cfg.llm_dim, generator=torch.Generator().manual_seed(n))
    states = [dec.start(spk[i], seed=i) for i in range(n)]
    first: list[float | None] = [None] * n
    samples = [0] * n
    emitted = 0
    start, cpu = time.perf_counter(), time.process_time()
    for s in states:
        dec.feed(s, text)
    for _ in range(chunks):
        out = dec.step_many(states)
        now = time.perf_counter()
        for i, got in enumerate(out):
            for c in got:
                emitted += 1
                samples[i] += c.audio.shape[0]
                if first[i] is None and c.audio.shape[0]:
                    first[i] = now - start
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    for s in states:
        dec.release(s)
    audio_s = samples[0] / SAMPLE_RATE
    return {
        "ttfa_ms": 1e3 * sum(f for f in first if f is not None) / n,
        "rtf": wall / audio_s,
        "cpu_rtf": cpu / audio_s / n,
        "chunks_per_s": emitted / wall,
        "audio_s_per_s": sum(samples) / SAMPLE_RATE / wall,
        "wall_s": wall,
    }


def run_answer(dec: SpeechDecoder, device: str) -> dict:
    """One whole spoken answer streamed 3 words at a time, then finished (see the module doc)."""
    words = ANSWER.split(" ")
    pieces = [" ".join(words[i : i + 3]) + " " for i in range(0, len(words), 3)]
    spk = torch.randn(dec.cfg.llm_dim, generator=torch.Generator().manual_seed(1))
    samples, first = 0, []

    def speak() -> None:
        nonlocal samples
        start = time.perf_counter()
        state = dec.start(spk, seed=1)
        for piece in pieces + [None]:
            for c in dec.push_text(state, piece) if piece is not None else dec.finish(state):
                samples += c.audio.shape[0]
                if not first and c.audio.shape[0]:
                    first.append(time.perf_counter() - start)

    wall, cpu = timed(speak, device)
    audio_s = samples / SAMPLE_RATE
    return {"utterances": 1, "ttfa_ms": 1e3 * first[0], "rtf": wall / audio_s, "cpu_rtf": cpu / audio_s,
            "audio_s": audio_s, "wall_s": wall}


def run_vocoder(vocoder: WaveDecoder, n: int, device: str) -> dict:
    """Steady-state chunks of n utterances: one `push_many` against n `push` calls."""
    gen = torch.Generator().manual_seed(n)
    history = torch.randint(0, 625, (n, OVERLAP_CODES, 4), generator=gen)
    chunks = list(torch.randint(0, 625, (n, CODES_PER_CHUNK, 4), generator=gen))

    def streams() -> list[VocoderStream]:  # as after a first chunk: 4 codes of history, a held tail
        return [VocoderStream(history=h, tail=torch.zeros(CROSSFADE_SAMPLES), prev_len=CODES_PER_CHUNK * 512)
                for h in history]

    serial, batched = streams(), streams()
    one_by_one, _ = timed(lambda: [vocoder.push(s, c) for s, c in zip(serial, chunks)], device)
    together, cpu = timed(lambda: vocoder.push_many(batched, chunks, [False] * n), device)
    return {"utterances": n, "wall_s": together, "cpu_rtf": cpu / (n * CODES_PER_CHUNK * 512 / SAMPLE_RATE),
            "audio_s_per_s": n * CODES_PER_CHUNK * 512 / SAMPLE_RATE / together,
            "batching_speedup": one_by_one / together}


def bench_config(config: str, device: str, chunks: int) -> list[dict]:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    dec = build_decoder(config, device, dtype)
    text = text_of(dec, chunks * dec.chunk_tokens)
    run_once(dec, 1, text, 1)  # warm-up
    head = {"config": config, "device": device, "dtype": str(dtype).removeprefix("torch.")}
    rows = []
    solo_wall = None
    for n in CONCURRENCY:
        result = run_once(dec, n, text, chunks)
        solo_wall = solo_wall or result["wall_s"]
        rows.append({**head, "workload": "chunks", "utterances": n, "chunks_each": chunks, **result,
                     "batching_speedup": n * solo_wall / result["wall_s"]})
    rows.append({**head, "workload": "answer", **run_answer(dec, device)})
    run_vocoder(dec.vocoder, 1, device)  # warm-up
    rows += [{**head, "workload": "vocoder", **run_vocoder(dec.vocoder, n, device)} for n in CONCURRENCY]
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    chunks = 1 if args.quick else 2
    rows: list[dict] = []
    for config in [c.strip() for c in args.configs.split(",") if c.strip()]:
        rows.extend(bench_config(config, args.device, chunks))
    return rows
