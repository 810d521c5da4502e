"""`minicpmo bench audio`: real-time factor (compute seconds per second of audio) of the audio encoder.

Offline: N concurrent clips encoded in one batched `encode` call. Streaming: N live streams each pushing 1 s chunks,
all streams' chunks of a step batched in one `encode_chunks` call (what a replica does each second), and the same
streams served one call at a time for comparison. Times include feature extraction (the replica does it).
`rtf_cpu` uses process CPU time, steadier than wall time on a shared machine; there, `OMP_NUM_THREADS=1` also
avoids torch's worker threads spinning against other processes.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import numpy as np
import torch

from services.audio_encoder.encoder import AudioEmbedder
from services.common.bench import timed
from services.common.bench_checkpoints import tiny_checkpoint
from services.common.config import small_config

STREAM_COUNTS = (1, 4, 16)


def build(config: str, device: str) -> AudioEmbedder:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if config == "tiny":
        return AudioEmbedder.from_checkpoint(tiny_checkpoint(), device=device, dtype=dtype)
    if config == "small":
        return AudioEmbedder.with_random_weights(small_config(), device=device, dtype=dtype)
    raise ValueError(f"unknown bench config {config!r}; use tiny or small")


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Noise with a slow envelope (not silence: silent frames take the same compute, but look less real)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    envelope = 0.5 + 0.5 * np.sin(np.linspace(0, seconds * 2 * np.pi * 3, n))
    return (rng.standard_normal(n) * 0.1 * envelope).astype(np.float32)


def row(mode: str, n: int, audio_s: float, times: list[tuple[float, float]], per_call: float) -> dict[str, Any]:
    wall, cpu = sum(t for t, _ in times), sum(c for _, c in times)
    return {"mode": mode, "streams": n, "audio_s": audio_s, "compute_s": wall, "rtf": wall / audio_s,
            "rtf_cpu": cpu / audio_s, "ms_per_call": 1e3 * per_call}


def bench_offline(enc: AudioEmbedder, n: int, clip_s: float, repeats: int, device: str) -> dict[str, Any]:
    clips = [speech_like(clip_s, i) for i in range(n)]
    enc.encode(clips)  # warm-up
    times = [timed(lambda: enc.encode(clips), device) for _ in range(repeats)]
    return row("offline", n, n * clip_s * repeats, times, statistics.median(t for t, _ in times))


def bench_streaming(enc: AudioEmbedder, n: int, steps: int, batched: bool, device: str) -> dict[str, Any]:
    chunks = [[speech_like(1.0, 100 * s + i) for s in range(steps)] for i in range(n)]
    enc.encode_chunks([enc.new_stream() for _ in range(n)], [c[0] for c in chunks])  # warm-up
    states = [enc.new_stream() for _ in range(n)]

    def step(s: int) -> None:
        if batched:
            enc.encode_chunks(states, [c[s] for c in chunks])
        else:
            for state, c in zip(states, chunks):
                enc.encode_chunk(state, c[s])

    times = [timed(lambda: step(s), device) for s in range(steps)]
    mode = "stream_batched" if batched else "stream_one_by_one"
    return row(mode, n, float(n * steps), times, statistics.median(t for t, _ in times))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = getattr(args, "device", "cpu")
    quick = getattr(args, "quick", False)
    clip_s, repeats, steps = (2.0, 1, 2) if quick else (4.0, 3, 4)
    rows: list[dict[str, Any]] = []
    for config in args.configs.split(","):
        enc = build(config.strip(), device)
        base = {"config": config.strip(), "device": device, "dtype": str(next(enc.model.parameters()).dtype),
                "threads": torch.get_num_threads()}
        for n in STREAM_COUNTS:
            rows.append(base | bench_offline(enc, n, clip_s, repeats, device))
            rows.append(base | bench_streaming(enc, n, steps, batched=True, device=device))
            if n > 1:
                rows.append(base | bench_streaming(enc, n, steps, batched=False, device=device))
    return rows
