"""What every model replica of the pipeline does the same way: dtype per device, CPU thread budget, health of
its device, and blocking model calls off the replica's event loop (so health checks and other sessions stay
responsive)."""

from __future__ import annotations

import asyncio
import contextvars
import os
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def replica_dtype(device: str) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (the parity contract of every component)."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def limit_threads() -> None:
    """One intra-op thread per replica unless told otherwise: replicas share the node's cores, and several
    torch thread pools on the same cores slow every stage down."""
    torch.set_num_threads(int(os.environ.get("MINICPMO_TORCH_THREADS", "1")))


def device_alive(device: str) -> None:
    """Health check of a model replica: its device still runs kernels (a lost or wedged GPU raises here)."""
    x = torch.ones(8, device=device)
    if float((x + x).sum()) != 16.0:
        raise RuntimeError(f"device {device} returned a wrong result")


async def off_loop(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run a blocking (torch) call in a worker thread; torch releases the GIL in its kernels."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def detached(fn: Callable[..., T], *args) -> T:
    """`fn(*args)` (a handle's `.remote`) run in an empty context: a fresh Serve request, not a child of the
    request being served. Ray Serve tags a call made while serving a request with that request's ids, and two
    calls with the same ids that overlap on one replica do not both get through."""
    return contextvars.Context().run(fn, *args)
