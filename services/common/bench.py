"""`minicpmo bench STAGE`: routes to each stage's benchmark and owns the shared output format.

A stage's benchmark is `services.<package>.bench:run(args) -> list[dict]` (one dict per table row); this module
prints the rows as a table and writes them, with the machine description, to `bench/results/<stage>.json`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

STAGES: dict[str, str] = {
    "vision": "services.vision_encoder.bench",
    "audio": "services.audio_encoder.bench",
    "llm": "services.llm_core.bench",
    "tts": "services.tts_decoder.bench",
    "pipeline": "services.app.bench",
    "live": "services.app.bench_live",
    "gpu": "services.app.bench_gpu",
}
# Not part of `bench all`: `gpu` needs a CUDA device and the real config's memory.
ALL = ("vision", "audio", "llm", "tts", "pipeline", "live")


def register_cli(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="run a benchmark, print a table, write JSON")
    p.add_argument("stage", choices=[*STAGES, "all"])
    p.add_argument("--configs", default="tiny,small", help="comma list of: tiny (golden-sized), small")
    p.add_argument("--out", default="bench/results", help="folder for <stage>.json")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=run_cli)


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def timed(fn: Callable[[], object], device: str) -> tuple[float, float]:
    """(wall s, process CPU s) of one call; CPU time is the steadier number on a shared machine."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        print(f"{title}: no rows")
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    print(f"\n== {title}")
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in cols))


def run_cli(args: argparse.Namespace) -> int:
    stages = list(ALL) if args.stage == "all" else [args.stage]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        started = time.time()
        rows = importlib.import_module(STAGES[stage]).run(args)
        print_table(f"bench {stage}", rows)
        result = {"stage": stage, "machine": machine(), "started": started, "rows": rows}
        (out / f"{stage}.json").write_text(json.dumps(result, indent=1))
        print(f"wrote {out / f'{stage}.json'}")
    return 0
