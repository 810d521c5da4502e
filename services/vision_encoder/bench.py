"""`minicpmo bench vision`: images/s and per-image latency of `ImageEmbedder.encode`, batched vs one at a time.

Workload: 640x480 JPEG frames with max_slice_nums=1, i.e. one ~448² slice per image (1024 patches), the live
video case where frames of many sessions arrive together. For N in 1, 4, 16 images: "batched" is one `encode`
call with all N (slices share forward passes); "one-at-a-time" is N calls of one image. Decode and slicing are
included in the times.

- images_per_s: N / total wall time.
- latency_ms: wall time of the call that returns an image (batched: the whole call, since all N come back
  together; one-at-a-time: the mean call).
- cpu_ms_per_image: process CPU time per image (all threads).
- speedup: batched images/s over one-at-a-time images/s at the same N.

Threads: like a deployed replica (`services.runtime.replica.limit_threads`: one intra-op thread unless
`MINICPMO_TORCH_THREADS` says otherwise). On this shared, oversubscribed 2-core machine two OpenMP threads made a
single-slice call up to 10x slower than a 16-slice one per slice (each op waits at a barrier for a descheduled
thread): noise about the machine, not the encoder.

Configs: "tiny" is the golden checkpoint (`$GOLDEN_DIR/checkpoint`, else a freshly generated tiny one); "small" is
`small_config()` with random weights (real depth and head dims, 1/8 widths). fp32 on CPU, bf16 on CUDA.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import torch
from PIL import Image

from services.common.bench import timed
from services.common.bench_checkpoints import tiny_checkpoint
from services.common.config import small_config
from services.common.image_layout import ImageProcessorConfig
from services.runtime.replica import limit_threads
from services.vision_encoder.encoder import ImageEmbedder
from services.vision_encoder.model import build_vision_model

IMAGE_COUNTS = (1, 4, 16)
FRAME_WH = (640, 480)
MAX_SLICE_NUMS = 1


def build_encoder(config: str, device: str, dtype: torch.dtype) -> ImageEmbedder:
    if config == "tiny":
        return ImageEmbedder.from_checkpoint(tiny_checkpoint(), device=device, dtype=dtype)
    if config == "small":
        cfg = small_config()
        torch.manual_seed(0)
        model = build_vision_model(cfg, device=device, dtype=dtype)
        return ImageEmbedder(model, ImageProcessorConfig.from_model_config(cfg), cfg.vision_batch_size)
    raise ValueError(f"unknown bench config {config!r}; use tiny or small")


def frames(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        pixels = rng.integers(0, 256, (FRAME_WH[1], FRAME_WH[0], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bench_config(config: str, device: str, reps: int) -> list[dict]:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    encoder = build_encoder(config, device, dtype)
    images = frames(max(IMAGE_COUNTS))
    slices = encoder.encode(images[:2], MAX_SLICE_NUMS)[0].layout.n_slices  # also the warm-up
    rows = []
    for n in IMAGE_COUNTS:
        batch = images[:n]
        # Both modes alternate within each repetition, so they see the same background load; best of `reps`
        # (as timeit does) is the number least disturbed by other work on the machine.
        batched, single = [], []
        for _ in range(reps):
            batched.append(timed(lambda: encoder.encode(batch, MAX_SLICE_NUMS), device))
            single.append(timed(lambda: [encoder.encode([im], MAX_SLICE_NUMS) for im in batch], device))
        (b_wall, b_cpu), (s_wall, s_cpu) = min(batched), min(single)
        common = {"config": config, "device": device, "dtype": str(dtype).removeprefix("torch."), "images": n,
                  "threads": torch.get_num_threads(), "slices_per_image": slices, "batch_size": encoder.batch_size}
        rows.append({**common, "mode": "batched", "images_per_s": n / b_wall, "latency_ms": b_wall * 1e3,
                     "cpu_ms_per_image": b_cpu * 1e3 / n, "speedup": s_wall / b_wall})
        rows.append({**common, "mode": "one-at-a-time", "images_per_s": n / s_wall, "latency_ms": s_wall * 1e3 / n,
                     "cpu_ms_per_image": s_cpu * 1e3 / n, "speedup": 1.0})
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    reps = 1 if args.quick else 2
    if args.device == "cpu":
        limit_threads()
    rows = []
    for config in [c.strip() for c in args.configs.split(",") if c.strip()]:
        rows.extend(bench_config(config, args.device, reps))
    return rows
