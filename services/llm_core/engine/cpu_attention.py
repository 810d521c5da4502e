"""Decode attention for CPU replicas: every decode row of a layer in one call of our C++ kernel, reading each
session's keys where they live in the arena (`csrc/decode_attention.cpp` says why not MKL).

The kernel is compiled on first use by torch's extension builder (g++ and ninja; ~20 s) and cached under
`TORCH_EXTENSIONS_DIR` (default ~/.cache/torch_extensions), which also serialises concurrent builds of several
replicas; `make setup` and the image build run `minicpmo build-kernels` so that no replica builds it while
serving. Where it cannot be built, `load` says why, once, and CPU decode rows run the per-session torch path
(`services.llm_core.model.sequence_attention`), which gives the same results more slowly.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
# The kernel's 8-float vectors on x86: AVX2 + FMA, on every x86 server CPU of the last decade. Not -march=native:
# an image built on one machine runs on nodes with other CPUs. (AVX-512 flags measured no faster: the loops are
# bound by memory, not arithmetic.)
_X86_FLAGS = ["-mavx2", "-mfma"]


@cache
def load() -> bool:
    """Build (or find the cached build of) the kernel and register its ops; False where it cannot be built or
    this CPU cannot run it."""
    # Its import warns, on a machine without a GPU, that no CUDA runtime exists: true, and irrelevant to a CPU kernel.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import load as build

    x86 = platform.machine() in ("x86_64", "AMD64")
    if x86 and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.warning("CPU decode attention kernel needs AVX2; CPU decode rows use the slower torch path")
        return False
    flags = ["-O3", *(_X86_FLAGS if x86 else [])]
    try:
        build("minicpmo_decode_attention", [str(SOURCE)], extra_cflags=flags, is_python_module=False)
    except (OSError, RuntimeError, ImportError) as e:  # no compiler, no ninja, a failed build
        log.warning("CPU decode attention kernel unavailable (%s); CPU decode rows use the slower torch path", e)
        return False
    return True


def usable(kv: torch.Tensor) -> bool:
    """The kernel can attend over this KV store (..., head_dim): float32 on the CPU, head_dim a multiple of 16 (a
    cache line of floats), and the kernel built."""
    return kv.device.type == "cpu" and kv.dtype == torch.float32 and kv.shape[-1] % 16 == 0 and load()


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """q (B, heads, head_dim): one decode row per sequence; k, v (kv_heads, rows, head_dim): a layer of the arena;
    row b attends to arena rows [offsets[b], offsets[b] + lengths[b]). Returns (B, heads, head_dim)."""
    scores = torch.ops.minicpmo.decode_scores(q, k, offsets, lengths, q.shape[-1] ** -0.5)
    return torch.ops.minicpmo.decode_values(torch.softmax(scores, dim=-1), v, offsets, lengths)


def register_cli(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="build the CPU decode attention kernel now (make setup, the image build)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO)
    if not load():
        print("could not build the CPU decode attention kernel (see the warning above)", file=sys.stderr)
        return 1
    print(f"CPU decode attention kernel ready ({SOURCE.name})")
    return 0
