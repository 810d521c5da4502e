"""The checkpoints the benchmarks run on, found or made in one place.

`tiny_checkpoint()`: the golden tiny checkpoint (`$GOLDEN_DIR/checkpoint`, default ../shared/golden beside the
checkout), else a tiny random one generated into .run/tiny-checkpoint. `small_checkpoint()`: `small_config()`
dims in the official layout with random weights, written once into .run/small-checkpoint. The small checkpoint
keeps the tiny tokenizers: its LLM keeps the real 151,700-row vocabulary (same lm_head compute) with the rows of
ids the tiny tokenizer lacks set to zero, so answers decode to text the TTS can speak; the TTS text vocabulary is
the tiny one (an embedding lookup: no compute difference).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

RUN_DIR = Path(".run")


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
    path = RUN_DIR / "small-checkpoint"
    if (path / "config.json").is_file():
        return path.resolve()
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    from services.common.checkpoint import INDEX_FILE
    from services.common.checkpoint_layout import official_shapes
    from services.common.config import ModelConfig, small_config
    from services.common.tiny_checkpoint import random_tensor

    tiny = tiny_checkpoint()
    tmp = path.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(tiny, tmp, ignore=shutil.ignore_patterns("*.safetensors", INDEX_FILE, "config.json"))
    cfg = json.loads((tiny / "config.json").read_text())
    s = small_config()
    cfg.update({k: getattr(s.llm, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "vocab_size")})  # fmt: skip
    cfg["max_window_layers"] = s.llm.num_hidden_layers
    cfg["vision_config"].update({k: getattr(s.vision, k) for k in ("hidden_size", "intermediate_size",
                                                                   "num_hidden_layers", "num_attention_heads")})  # fmt: skip
    cfg["audio_config"].update({k: getattr(s.audio, k) for k in ("d_model", "encoder_ffn_dim", "encoder_layers",
                                                                 "encoder_attention_heads")})  # fmt: skip
    cfg["tts_config"].update({k: getattr(s.tts, k) for k in ("llm_dim", "hidden_size", "intermediate_size",
                                                             "num_attention_heads", "num_hidden_layers")})  # fmt: skip
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    n_tok = Tokenizer.from_file(str(tmp / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in official_shapes(ModelConfig.from_dict(cfg)).items():
        t = random_tensor(name, shape, gen)
        if name == "llm.lm_head.weight":
            t[n_tok:] = 0  # ids the tokenizer lacks never win the argmax (see the module doc)
        tensors[name] = t.to(torch.bfloat16)
    shard = "model-00001-of-00001.safetensors"
    save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
    total = sum(t.numel() * 2 for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: shard for k in tensors}}
    (tmp / INDEX_FILE).write_text(json.dumps(index))
    tmp.rename(path)
    return path.resolve()
