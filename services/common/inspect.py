"""`minicpmo inspect-checkpoint DIR`: what a checkpoint directory holds and whether it has the official layout.

Reads only headers (no tensor data), so it is instant even on the real 8B checkpoint. Exit status 1 when keys
are missing, unexpected or mis-shaped versus `official_shapes(config)` (or expected files are missing), 2 when
the directory cannot be read as a checkpoint at all, so scripts and init containers can gate on it.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from services.common.checkpoint import CheckpointError, CheckpointReader
from services.common.checkpoint_layout import SERVICE_PREFIXES, official_shapes, service_of
from services.common.config import ModelConfig

# Files besides the weights that the services read (each entry: any one of the alternatives will do).
EXPECTED_FILES: tuple[tuple[str, ...], ...] = (
    ("config.json",), ("tokenizer.json",), ("tokenizer_config.json",), ("preprocessor_config.json",),
    ("assets/Vocos.pt",), ("assets/chattts_tokenizer/tokenizer.json", "assets/chattts_tokenizer/vocab.txt"),
)
SHOWN_KEYS = 10  # how many names of each problem kind to print


@dataclass
class CheckpointSummary:
    model_dir: Path
    config: ModelConfig
    shards: dict[str, int]  # shard file -> tensor count
    params: dict[str, int]  # service -> parameter count
    dtypes: dict[str, int]  # stored dtype -> tensor count
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.missing_files)


def summarize(model_dir: str | Path) -> CheckpointSummary:
    model_dir = Path(model_dir)
    reader = CheckpointReader(model_dir)
    config = ModelConfig.from_model_dir(model_dir)
    expected = official_shapes(config)
    stored = {k: reader.shape(k) for k in reader.keys()}
    params: Counter[str] = Counter({s: 0 for s in SERVICE_PREFIXES})
    for k, shape in stored.items():
        params[service_of(k) or "other"] += math.prod(shape)
    return CheckpointSummary(
        model_dir=model_dir,
        config=config,
        shards=dict(sorted(Counter(reader.weight_map.values()).items())),
        params=dict(params),
        dtypes=dict(Counter(reader.dtype(k) for k in stored)),
        missing=sorted(set(expected) - set(stored)),
        unexpected=sorted(set(stored) - set(expected)),
        mismatched=[f"{k}: {stored[k]} (official layout {expected[k]})"
                    for k in sorted(set(stored) & set(expected)) if stored[k] != expected[k]],
        missing_files=[" or ".join(alts) for alts in EXPECTED_FILES if not any((model_dir / f).is_file() for f in alts)],
    )


def _config_lines(c: ModelConfig) -> list[str]:
    l, v, a, t = c.llm, c.vision, c.audio, c.tts
    return [
        f"  llm     Qwen2: hidden {l.hidden_size}, {l.num_hidden_layers} layers, heads {l.num_attention_heads}"
        f" (kv {l.num_key_value_heads}), ffn {l.intermediate_size}, vocab {l.vocab_size}",
        f"  vision  SigLIP: hidden {v.hidden_size}, {c.vision_layers_used} layers used, heads"
        f" {v.num_attention_heads}; resampler {c.query_num} queries, {c.resampler_heads} heads;"
        f" max {c.slice.max_slice_nums} slices",
        f"  audio   Whisper: d_model {a.d_model}, {a.encoder_layers} layers, heads {a.encoder_attention_heads},"
        f" pool {c.audio_pool_step}",
        f"  tts     ChatTTS: hidden {t.hidden_size}, {t.num_hidden_layers} layers, heads {t.num_attention_heads},"
        f" text vocab {t.num_text_tokens}, {t.num_vq} codebooks of {t.num_audio_tokens}",
        f"  stored dtype (config) {c.torch_dtype}",
    ]


def _problem_lines(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    more = f" (+{len(items) - SHOWN_KEYS} more)" if len(items) > SHOWN_KEYS else ""
    return [f"  {title} ({len(items)}){more}:"] + [f"    {x}" for x in items[:SHOWN_KEYS]]


def render(s: CheckpointSummary) -> str:
    lines = [f"checkpoint {s.model_dir}", "config:", *_config_lines(s.config), f"shards ({len(s.shards)}):"]
    lines += [f"  {name}  {n} tensors" for name, n in s.shards.items()]
    lines.append("parameters per service:")
    for service, n in s.params.items():
        prefixes = "+".join(SERVICE_PREFIXES.get(service, ("(no service prefix)",)))
        lines.append(f"  {service:<7} {prefixes:<32} {n:>15,}")
    lines.append(f"  {'total':<7} {'':<32} {sum(s.params.values()):>15,}")
    lines.append("dtypes: " + ", ".join(f"{d} x{n}" for d, n in sorted(s.dtypes.items())))
    lines.append(
        f"versus the official layout: {len(s.missing)} missing, {len(s.unexpected)} unexpected,"
        f" {len(s.mismatched)} shape mismatches"
    )
    lines += _problem_lines("missing keys", s.missing)
    lines += _problem_lines("unexpected keys", s.unexpected)
    lines += _problem_lines("shape mismatches", s.mismatched)
    lines += _problem_lines("missing files", s.missing_files)
    lines.append("OK" if s.ok else "NOT the official layout (see above)")
    return "\n".join(lines)


def register_cli(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="summarise a checkpoint directory and check it against the official layout")
    p.add_argument("dir", type=Path, help="checkpoint directory (official MiniCPM-o 2.6 layout)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        summary = summarize(args.dir)
    except (CheckpointError, OSError, ValueError) as e:  # unreadable directory: say why, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(summary))
    return 0 if summary.ok else 1
