"""`minicpmo bench tts`: streaming speech synthesis with 1, 4 and 16 concurrent utterances on one replica.

Workload per utterance: a text of `chunks` x 10 TTS tokens arrives at once (the LLM is faster than the TTS), and the
decoder emits `chunks` audio chunks of 25 codes (~0.53 s each) through `step_many`, which batches the generation
steps of all utterances and vocodes equal-length chunks together. Sampling runs with upstream settings and a seed;
eos is disabled (upstream's `force_no_stop`) so every run does the same work regardless of the random weights.

- ttfa_ms: time to first audio, mean over utterances (from the moment all texts are there).
- rtf: wall time / audio seconds of one utterance (< 1: each stream is faster than real time).
- chunks_per_s: audio chunks emitted per second, all utterances together.
- audio_s_per_s: seconds of audio produced per wall second, all utterances together.
- batching_speedup: N x (wall time of 1 utterance) / (wall time of N together), i.e. the gain of `step_many`
  over serving the N utterances one after another.

Configs: "tiny" = the golden checkpoint (else a generated tiny one); "small" = `small_config()` with random
weights (real depth and head dims, 1/8 widths; DVAE and Vocos at their fixed official size). fp32 on CPU, bf16 on
CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch

from services.common.config import small_config
from services.tts_decoder.dvae import DVAE
from services.tts_decoder.model import build_tts
from services.tts_decoder.streaming import TTSDecoder
from services.tts_decoder.text import ChatTTSText
from services.tts_decoder.vocoder import SAMPLE_RATE, Vocoder, build_vocos

CONCURRENCY = (1, 4, 16)
WORDS = ("the quick brown fox jumps over the lazy dog while a calm voice reads this sentence aloud for the "
         "benchmark and keeps going with more plain words so that every utterance has enough text").split()


def tiny_checkpoint_dir() -> Path:
    golden = Path(os.environ.get("GOLDEN_DIR", Path(__file__).resolve().parents[3] / "shared" / "golden"))
    if (golden / "checkpoint" / "config.json").is_file():
        return golden / "checkpoint"
    from services.common.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="minicpmo-tiny-")))


def build_decoder(config: str, device: str, dtype: torch.dtype) -> TTSDecoder:
    tiny = tiny_checkpoint_dir()
    if config == "tiny":
        dec = TTSDecoder(tiny, device=device, dtype=dtype)
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
        vocoder = Vocoder.from_parts(dvae, build_vocos(), device, dtype)
        dec = TTSDecoder.from_parts(cfg, ChatTTSText(tiny, cfg), model, vocoder)
    else:
        raise ValueError(f"unknown config {config!r} (tiny, small)")
    dec.sampler.force_no_stop = True
    return dec


def text_of(dec: TTSDecoder, n_tokens: int) -> str:
    """The shortest prefix of WORDS with at least `n_tokens` TTS tokens."""
    for k in range(1, len(WORDS) + 1):
        text = " ".join(WORDS[:k])
        if dec.text.count(text) >= n_tokens:
            return text
    raise ValueError(f"benchmark text has fewer than {n_tokens} TTS tokens")


def run_once(dec: TTSDecoder, n: int, text: str, chunks: int) -> dict:
    spk = torch.randn(n, dec.cfg.llm_dim, generator=torch.Generator().manual_seed(n))
    states = [dec.start(spk[i], seed=i) for i in range(n)]
    first: list[float | None] = [None] * n
    samples = [0] * n
    emitted = 0
    start = time.perf_counter()
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
    wall = time.perf_counter() - start
    audio_s = samples[0] / SAMPLE_RATE
    return {
        "ttfa_ms": 1e3 * sum(f for f in first if f is not None) / n,
        "rtf": wall / audio_s,
        "chunks_per_s": emitted / wall,
        "audio_s_per_s": sum(samples) / SAMPLE_RATE / wall,
        "wall_s": wall,
    }


def bench_config(config: str, device: str, chunks: int) -> list[dict]:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    dec = build_decoder(config, device, dtype)
    text = text_of(dec, chunks * dec.chunk_tokens)
    run_once(dec, 1, text, 1)  # warm-up
    rows = []
    solo_wall = None
    for n in CONCURRENCY:
        result = run_once(dec, n, text, chunks)
        solo_wall = solo_wall or result["wall_s"]
        rows.append({"config": config, "device": device, "dtype": str(dtype).removeprefix("torch."),
                     "utterances": n, "chunks_each": chunks, **result,
                     "batching_speedup": n * solo_wall / result["wall_s"]})
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    chunks = 1 if args.quick else 2
    rows: list[dict] = []
    for config in [c.strip() for c in args.configs.split(",") if c.strip()]:
        rows.extend(bench_config(config, args.device, chunks))
    return rows
