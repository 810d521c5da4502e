"""The environment of every process that runs torch: the replicas (through `services.app.serve_env.SERVE_ENV`,
whose doc gives the measurements) and the `minicpmo` CLI, whose benchmarks run stages in its own process.

torch reads these once, early, so they must be in the environment before torch is imported.
"""

from __future__ import annotations

import os

# Tensors of 2 MiB or more (weights, their prepacked copies, the KV arena) on transparent huge pages.
TORCH_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def use_torch_env() -> None:
    """Before torch is imported: `TORCH_ENV`, unless the caller's environment already says otherwise."""
    for key, value in TORCH_ENV.items():
        os.environ.setdefault(key, value)
