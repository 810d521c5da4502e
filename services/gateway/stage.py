"""What every Ray Serve replica of the pipeline does the same way: dtype per device, CPU thread budget, and
running blocking model calls off the replica's event loop (so health checks and other sessions stay responsive).
"""

from __future__ import annotations

import asyncio
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


class OwnedSessions:
    """The sessions whose state (LLM KV, streaming audio) this replica holds, fenced by the store's leases.

    On every request the replica acquires the session's lease; its local state is valid only if it was built
    under the epoch it gets back (a replica that lost the session, even briefly, rebuilds). A background sweep
    drops the state of sessions whose Redis record is gone (closed or expired), so no state outlives its session.
    """

    def __init__(self, store, role: str, drop: Callable[[str], object], sweep_s: float = 15.0):
        from ray import serve

        self.store = store
        self.role = role
        self.drop = drop
        self.sweep_s = sweep_s
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.epochs: dict[str, int] = {}
        self._sweeper: asyncio.Task | None = None

    async def fence(self, session_id: str, has_state: bool):
        """(fence, rebuild?) for a request on `session_id`."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep())
        fence = await self.store.acquire(session_id, self.role, self.replica_id)
        return fence, not has_state or self.epochs.get(session_id) != fence.epoch

    def built(self, session_id: str, epoch: int) -> None:
        self.epochs[session_id] = epoch

    def forget(self, session_id: str) -> None:
        self.epochs.pop(session_id, None)
        self.drop(session_id)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_s)
            try:
                for sid in await self.store.missing(list(self.epochs)):
                    self.forget(sid)
            except Exception:  # Redis blip: try again next period; never kill the replica's loop
                continue


def session_store(redis_url: str, **store_kwargs):
    """The session store over a Redis client that survives a Redis restart: a pooled connection the old server
    closed is retried once on a fresh connection instead of failing the call (redis-py's `from_url` clients do not
    retry by default). Socket waits stay bounded, so with Redis down calls fail fast with StoreUnavailable."""
    import redis.asyncio as aioredis
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.asyncio.retry import Retry

    from services.gateway.sessions import SessionStore

    client = aioredis.Redis.from_url(
        redis_url,
        decode_responses=False,
        socket_timeout=5.0,
        socket_connect_timeout=5.0,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=1),
        retry_on_error=[RedisConnectionError],
    )
    return SessionStore(client, **store_kwargs)
