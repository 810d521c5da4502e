"""The golden set (`$GOLDEN_DIR`, default ../shared/golden): case metadata, reference tensors, comparison rules.

Every parity test compares through `GoldenSet.check`, which applies the rule cases.json gives for that tensor, so
no test carries its own tolerance or depends on this particular set's numbers.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import load_file

DEFAULT_GOLDEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
NEAR_TIE_MARGIN = 1e-4


def golden_dir() -> Path:
    return Path(os.environ.get("GOLDEN_DIR", DEFAULT_GOLDEN_DIR))


class GoldenSet:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or golden_dir())
        meta = json.loads((self.root / "cases.json").read_text())
        self.cases: dict[str, Any] = meta["cases"]
        self.specs: dict[str, Any] = meta["tensors"]
        self.inputs: dict[str, Any] = meta["inputs"]

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        with torch.inference_mode(False):  # first use may be inside a test's inference_mode; keep them normal tensors
            return load_file(str(self.root / "cases.safetensors"))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def names(self, case: str) -> list[str]:
        return list(self.cases[case]["tensors"])

    def path(self, rel: str) -> Path:
        return self.root / rel

    def wav(self, rel: str) -> np.ndarray:
        """An input wav as upstream loads it: soundfile float32 (int16/32768). `rel` may end in `[a:b]`."""
        span = None
        if rel.endswith("]"):
            rel, _, rng = rel[:-1].partition("[")
            span = tuple(int(x) for x in rng.split(":"))
        audio, _ = sf.read(str(self.root / rel), dtype="float32")
        return audio[span[0] : span[1]] if span else audio

    def check(self, name: str, actual: torch.Tensor | np.ndarray) -> None:
        """Assert `actual` matches golden tensor `name` under its cases.json rule."""
        spec = self.specs[name]
        golden = self.tensors[name]
        actual = torch.as_tensor(actual).detach().cpu()
        assert tuple(actual.shape) == tuple(golden.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(golden.shape)}"
        mode = spec["compare"]["mode"]
        if mode == "exact":
            if golden.is_floating_point():
                assert torch.equal(actual.to(golden.dtype), golden), f"{name}: not exactly equal"
            else:
                diff = (actual.long() != golden.long()).nonzero()
                assert diff.numel() == 0, f"{name}: {len(diff)} elements differ, first at {diff[0].tolist()}"
        elif mode == "allclose":
            err = (actual.double() - golden.double()).abs().max().item() if golden.numel() else 0.0
            assert err <= spec["compare"]["atol"], f"{name}: max |diff| {err:.3g} > atol {spec['compare']['atol']}"
        elif mode == "exact_except_near_ties":
            margin = self.tensors[name.replace("logits_argmax", "logits_top2_margin")]
            decisive = margin > NEAR_TIE_MARGIN
            bad = ((actual.long() != golden.long()) & decisive).nonzero()
            assert bad.numel() == 0, f"{name}: argmax differs at decisive positions {bad.flatten().tolist()[:10]}"
        else:
            raise AssertionError(f"{name}: unknown compare mode {mode!r}")
