"""What every model replica of the pipeline does the same way: dtype per device, CPU thread budget, health of
its device, blocking model calls off the replica's event loop (so health checks and other sessions stay
responsive), and a log line saying how long it took to start."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")
log = logging.getLogger("ray.serve")
_BACKGROUND: set[asyncio.Task] = set()  # tasks started by `in_background` that have not ended yet


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


def in_background(coro: Coroutine) -> asyncio.Task:
    """`coro` run as a task nobody awaits, referenced here until it ends (the event loop holds its tasks only
    weakly, so an unreferenced one may be collected before it finishes)."""
    task = asyncio.get_running_loop().create_task(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return task


def with_own_transport(handle: T) -> T:
    """`handle` (a Serve DeploymentHandle a replica was given) sending by value over gRPC when this process runs
    with `RAY_SERVE_USE_GRPC_BY_DEFAULT=1` (`services.app.serve_env`), by reference otherwise.

    A handle carries the transport of the process that created it: the one that built the app, which may have
    imported Ray Serve before that variable was set (the benchmark, after its in-process run, or the test session)
    and then hands every replica by-reference handles. The replica's own environment is the one that counts."""
    from ray.serve._private.constants import RAY_SERVE_USE_GRPC_BY_DEFAULT

    return handle.options(_by_reference=not RAY_SERVE_USE_GRPC_BY_DEFAULT)


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc: its start time in clock ticks after boot)."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def reports_startup(init: Callable[..., None]) -> Callable[..., None]:
    """Decorates a replica's `__init__`: logs its constructor time (weights, warm-up) and its time since the
    process started (worker start + imports + constructor), the parts of a replacement's delay that are ours;
    the rest is Ray Serve noticing the death and placing the new actor."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs) -> None:
        started = time.monotonic()
        init(self, *args, **kwargs)
        log.info("%s ready: constructor %.2f s, process started %.2f s ago", type(self).__name__,
                 time.monotonic() - started, process_age_s())  # fmt: skip

    return wrapper
