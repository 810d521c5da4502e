"""What every Ray Serve replica of the pipeline does the same way: dtype per device, CPU thread budget, and
running blocking model calls off the replica's event loop (so health checks and other sessions stay responsive).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any, TypeVar

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

    Idempotent retries: the gateway gives every logged request an id, stored with its replay entry, and sends
    the same id again when it retries a call whose replica died. `applied` maps the ids that the local state
    already holds (applied here, or replayed from the log by a rebuild) to what their answer needs, so a retry
    of a request the old owner logged but never answered is answered from here instead of applied twice. This
    is exact because the local state is always "the log under our epoch": only the lease holder appends, and
    any failure that leaves the two in doubt forgets the state (the next request rebuilds it from the log).
    """

    def __init__(self, store, role: str, drop: Callable[[str], object], sweep_s: float = 15.0):
        from ray import serve

        self.store = store
        self.role = role
        self.drop = drop
        self.sweep_s = sweep_s
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.epochs: dict[str, int] = {}
        self.applied: dict[str, dict[str, Any]] = {}  # session id -> {request id: its result}
        self._locks: dict[str, asyncio.Lock] = {}
        self._sweeper: asyncio.Task | None = None

    def lock(self, session_id: str) -> asyncio.Lock:
        """Orders a session's state-changing calls on this replica (a retry racing its original waits for it)."""
        return self._locks.setdefault(session_id, asyncio.Lock())

    async def fence(self, session_id: str, has_state: bool):
        """(fence, rebuild?) for a request on `session_id`."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep())
        fence = await self.store.acquire(session_id, self.role, self.replica_id)
        return fence, not has_state or self.epochs.get(session_id) != fence.epoch

    def built(self, session_id: str, epoch: int) -> None:
        self.epochs[session_id] = epoch

    def result(self, session_id: str, request_id: str) -> Any:
        """What the already-applied request `request_id` answered, None if the local state lacks it."""
        return self.applied.get(session_id, {}).get(request_id) if request_id else None

    def record(self, session_id: str, request_id: str, result: Any) -> None:
        if request_id:
            self.applied.setdefault(session_id, {})[request_id] = result

    def unrecord(self, session_id: str, request_id: str) -> None:
        self.applied.get(session_id, {}).pop(request_id, None)

    def discard(self, session_id: str) -> None:
        """Stop vouching for the local state (it is rebuilt from the log on the next request)."""
        self.epochs.pop(session_id, None)
        self.applied.pop(session_id, None)
        lock = self._locks.get(session_id)
        if lock is not None and not lock.locked():
            del self._locks[session_id]

    def forget(self, session_id: str) -> None:
        self.discard(session_id)
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
