"""The checkpoints the benchmarks run on, found or made in one place.

`tiny_checkpoint()`: the golden tiny checkpoint (`$GOLDEN_DIR/checkpoint`, default ../shared/golden beside the
checkout), else a tiny random one generated into .run/tiny-checkpoint. `small_checkpoint()`: `small_config()`
dims in the official layout with random weights, written once into .run/small-checkpoint;
`real_dims_checkpoint()` likewise at `real_config()` dims (~8.7 B parameters, ~17 GB) into
.run/real-dims-checkpoint, for `minicpmo bench gpu`. These random checkpoints keep the tiny tokenizers: their
LLM keeps the real 151,700-row vocabulary (same lm_head compute) with the rows of ids the tiny tokenizer lacks set
to zero, so answers decode to text the TTS can speak; the TTS text vocabulary is the tiny one (an embedding
lookup: no compute difference).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from services.common.config import ModelConfig

RUN_DIR = Path(".run")
REAL_SHARD_BYTES = 2 << 30  # ~9 shards for the real dims: one is written while the next is drawn
WRITERS = 2  # shards being written at once (bounds the drawn-but-unwritten weights held in memory)
# Dimensions a random checkpoint takes from its config; the rest of config.json is the tiny checkpoint's (token
# ids, max_position_embeddings 4096: rotary angles are computed per position, nothing stored depends on it).
LLM_DIMS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size")  # fmt: skip
VISION_DIMS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
AUDIO_DIMS = ("d_model", "encoder_ffn_dim", "encoder_layers", "encoder_attention_heads")
TTS_DIMS = ("llm_dim", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")


def tiny_checkpoint() -> Path:
    golden = Path(os.environ.get("GOLDEN_DIR", Path(__file__).resolve().parents[3] / "shared" / "golden"))
    if (golden / "checkpoint" / "config.json").is_file():
        return golden / "checkpoint"
    path = RUN_DIR / "tiny-checkpoint"
    if not (path / "config.json").is_file():
        from services.common.tiny_checkpoint import make_tiny_checkpoint

        make_tiny_checkpoint(path)
    return path.resolve()


def small_checkpoint() -> Path:
    """small_config() dims in the official layout, random weights (written once)."""
    from services.common.config import small_config

    return random_checkpoint("small-checkpoint", small_config())


def real_dims_checkpoint(device: str = "cpu") -> Path:
    """real_config() dims in the official layout, random weights drawn on `device` (written once, ~17 GB)."""
    from services.common.config import real_config

    return random_checkpoint("real-dims-checkpoint", real_config(), device, REAL_SHARD_BYTES)


def random_config_json(tiny: dict, cfg: ModelConfig) -> dict:
    """The tiny checkpoint's config.json with `cfg`'s dimensions (token ids stay the tiny tokenizer's)."""
    out = json.loads(json.dumps(tiny))
    out.update({k: getattr(cfg.llm, k) for k in LLM_DIMS})
    out["max_window_layers"] = cfg.llm.num_hidden_layers
    out["vision_config"].update({k: getattr(cfg.vision, k) for k in VISION_DIMS})
    out["audio_config"].update({k: getattr(cfg.audio, k) for k in AUDIO_DIMS})
    out["tts_config"].update({k: getattr(cfg.tts, k) for k in TTS_DIMS})
    return out


def random_checkpoint(name: str, cfg: ModelConfig, device: str = "cpu", shard_bytes: int | None = None) -> Path:
    """`cfg`'s dims in the official layout with random bf16 weights (seed 0, drawn on `device`) and the tiny
    checkpoint's other files, written once into .run/<name>; `shard_bytes` cuts the weights into shards of about
    that size (None: one shard)."""
    path = RUN_DIR / name
    if (path / "config.json").is_file():
        return path.resolve()
    from tokenizers import Tokenizer

    from services.common.checkpoint import INDEX_FILE
    from services.common.checkpoint_layout import official_shapes

    tiny = tiny_checkpoint()
    tmp = path.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(tiny, tmp, ignore=shutil.ignore_patterns("*.safetensors", INDEX_FILE, "config.json"))
    config = random_config_json(json.loads((tiny / "config.json").read_text()), cfg)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    n_tok = Tokenizer.from_file(str(tmp / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    shapes = official_shapes(ModelConfig.from_dict(config))
    gen = torch.Generator(device).manual_seed(0)
    draw = lambda k: random_weight(k, shapes[k], gen, n_tok)
    weight_map = write_shards(tmp, shard_plan(shapes, shard_bytes), draw)
    total = sum(math.prod(s) * 2 for s in shapes.values())
    (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    tmp.rename(path)
    return path.resolve()


def random_weight(name: str, shape: tuple[int, ...], gen: torch.Generator, n_tok: int) -> torch.Tensor:
    """One bf16 tensor on the CPU, drawn on the generator's device (a GPU draws the real dims in seconds)."""
    from services.common.tiny_checkpoint import random_tensor

    with torch.device(gen.device):  # random_tensor's factory calls follow the generator's device
        t = random_tensor(name, shape, gen)
    if name == "llm.lm_head.weight":
        t[n_tok:] = 0  # ids the tokenizer lacks never win the argmax (see the module doc)
    return t.to(torch.bfloat16).cpu()


def shard_plan(shapes: dict[str, tuple[int, ...]], shard_bytes: int | None) -> list[list[str]]:
    """The names in order, cut into runs of about `shard_bytes` of bf16 (one run when None)."""
    plan: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shard_bytes is not None and plan[-1] and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    return plan


def write_shards(out: Path, plan: list[list[str]], draw: Callable[[str], torch.Tensor]) -> dict[str, str]:
    """Draw each shard's tensors and write it while the next is drawn; name -> shard file, in plan order."""
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    started = time.perf_counter()
    with ThreadPoolExecutor(WRITERS) as pool:
        pending: list[Future] = []
        for i, names in enumerate(plan, start=1):
            shard = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
            tensors = {k: draw(k) for k in names}
            if len(pending) >= WRITERS:
                pending.pop(0).result()
            pending.append(pool.submit(save_file, tensors, str(out / shard), metadata={"format": "pt"}))
            weight_map |= dict.fromkeys(names, shard)
            gb = sum(t.numel() * 2 for t in tensors.values()) / 1e9
            print(f"{out.stem}: drew {shard} ({gb:.2f} GB), {time.perf_counter() - started:.0f} s", file=sys.stderr)
        for f in pending:
            f.result()
    print(f"{out.stem}: {len(plan)} shards written in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return weight_map
