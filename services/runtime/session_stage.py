"""The base of a stage that holds per-session state built from the session's replay log (LLMCore's KV,
AudioEncoder's streaming Whisper state): lock -> fence -> rebuild -> idempotent record -> log-then-apply, and
a sweep that frees the state of sessions that ended.

The protocol, per request on session `sid` (one replica at a time owns `sid`'s state; see ownership.py):
1. lock: a session's state-changing calls run one at a time on this replica (a retry racing its original
   waits for it);
2. fence: acquire the session's lease for this role; the local state is valid only if it was built under the
   epoch that comes back, otherwise (a replica that lost the session, even briefly, or never had it) it is
   rebuilt from the role's replay log. A request whose first Redis call is a fenced write (`log_then_apply`)
   skips the acquire while the replica holds the session's state: the write itself checks, atomically, that
   the lease is still this replica's at the state's epoch, and when it is not (LeaseLost) the request takes
   the acquire-and-rebuild path. One Redis round trip per logged request, not two;
3. idempotent record: the gateway gives every logged request an id, the same on each retry; `applied` maps the
   ids the local state holds (applied here, or replayed by a rebuild) to what their answer needs, so a retry
   of a request the old owner logged but never answered is answered from the record instead of applied twice.
   The gateway retries only a session's latest requests (its calls for a session are in order), so the record
   keeps the last `RECORDED` results per session (bounded memory for sessions that last hours);
4. log-then-apply: the entry goes into the log (fenced, limit-checked) and into the local state; any failure
   of either forgets the local state (the next request rebuilds it from the log), so whenever the session's
   lock is free the local state is "the log under our epoch". By default the write comes first. With
   `overlap` the two run together (the LLM's forward does not wait for Redis): the state may run ahead of the
   log only while the lock is held, the reply waits for both (an answered request is always in the log), and
   the lock is released only once the write has settled, so a rebuild after a failure sees the entry or
   never will;
5. sweep: a background task (started once, on first use) drops the state of sessions that ended (record gone)
   or moved (their lease taken by another replica: a scale-up moves sessions to the new ranks, and the state
   left behind would otherwise hold its memory, and LLMCore's promise of KV room, until the session expired).

Subclasses implement the domain: `has_state`, `drop_state`, `rebuild` (and call `log_then_apply`, or `owned`
plus `record`/`forget` for requests whose log entry is only known after they ran, like a streamed answer).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar, TypeVar

from protos.minicpmo.v1 import replay_pb2
from services.runtime.ownership import Fence, LeaseLost, OwnershipStore, SessionLimitExceeded, SessionNotFound

R = TypeVar("R")
Apply = Callable[[Fence], Awaitable[R]]  # changes a session's local state under the fence
log = logging.getLogger("ray.serve")
RECORDED = 32  # results kept per session for retries (far more than a session's requests in flight)


class SessionStage:
    role: ClassVar[str]  # "llm" / "audio": which lease and which log
    sweep_period_s: ClassVar[float] = 15.0

    def __init__(self, store: OwnershipStore | None, replica_id: str) -> None:
        self.store = store
        self.replica_id = replica_id
        self.epochs: dict[str, int] = {}  # session id -> epoch its local state was built under
        self.applied: dict[str, OrderedDict[str, Any]] = {}  # session id -> {request id: its result}, newest last
        self._locks: dict[str, asyncio.Lock] = {}
        self._sweeper: asyncio.Task | None = None

    # --- the domain (subclasses) --------------------------------------------------------------------------------

    def has_state(self, session_id: str) -> bool:
        raise NotImplementedError

    def drop_state(self, session_id: str) -> None:
        raise NotImplementedError

    async def rebuild(self, session_id: str, entries: Sequence[replay_pb2.ReplayEntry]) -> dict[str, Any]:
        """Build the session's state from its log; return {request id: result} of (at least the last
        `RECORDED`) logged requests, in log order."""
        raise NotImplementedError

    # --- the protocol -------------------------------------------------------------------------------------------

    def _store(self) -> OwnershipStore:
        if self.store is None:
            raise RuntimeError(f"{type(self).__name__} was started without redis_url: live sessions are unavailable")
        return self.store

    @asynccontextmanager
    async def owned(self, session_id: str) -> AsyncIterator[Fence]:
        """Lock the session on this replica and fence it, rebuilding its state from the log if stale."""
        async with self._locked(session_id):
            yield await self._fence(session_id)

    @asynccontextmanager
    async def _locked(self, session_id: str) -> AsyncIterator[None]:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep())
        async with self._locks.setdefault(session_id, asyncio.Lock()):
            yield

    async def _fence(self, session_id: str) -> Fence:
        """Under the session's lock: acquire its lease; rebuild the local state from the log if it is stale."""
        store = self._store()
        fence = await store.acquire(session_id, self.role, self.replica_id)
        if not self.has_state(session_id) or self.epochs.get(session_id) != fence.epoch:
            self.discard(session_id)
            self.drop_state(session_id)
            results = await self.rebuild(session_id, await store.log(session_id, self.role))
            for rid, result in results.items():
                self.record(session_id, rid, result)
            self.epochs[session_id] = fence.epoch
        return fence

    def _held_fence(self, session_id: str) -> Fence | None:
        """The fence the local state was built under, not checked with Redis (None: no local state): only for a
        request whose first Redis call is a write fenced with it."""
        epoch = self.epochs.get(session_id)
        if epoch is None or not self.has_state(session_id):
            return None
        return Fence(session_id, self.role, self.replica_id, epoch)

    def result(self, session_id: str, request_id: str) -> Any:
        """What the already-applied request `request_id` answered; None if the local state lacks it."""
        return self.applied.get(session_id, {}).get(request_id) if request_id else None

    def record(self, session_id: str, request_id: str, result: Any) -> None:
        if request_id:
            results = self.applied.setdefault(session_id, OrderedDict())
            results[request_id] = result
            results.move_to_end(request_id)
            while len(results) > RECORDED:
                results.popitem(last=False)

    def unrecord(self, session_id: str, request_id: str) -> None:
        self.applied.get(session_id, {}).pop(request_id, None)

    async def log_then_apply(
        self,
        session_id: str,
        request_id: str,
        entry: Callable[[], replay_pb2.ReplayEntry],
        apply: Apply[R],
        *,
        overlap: bool = False,
    ) -> R:
        """Steps 1-4 for a request whose log entry is known before it runs (a prefill, an audio chunk);
        `apply(fence)` changes the local state; `overlap`: apply while the entry is being written (step 4)."""
        async with self._locked(session_id):
            done = self.result(session_id, request_id)
            if done is not None:  # a retry of a request the session already holds
                return done
            held = self._held_fence(session_id)
            if held is not None:
                try:
                    return await self._log_and_apply(held, request_id, entry, apply, overlap)
                except LeaseLost:
                    pass  # another replica took the session since: take it back and rebuild, as below
            fence = await self._fence(session_id)
            done = self.result(session_id, request_id)  # the rebuild replayed it (logged by the previous owner)
            if done is not None:
                return done
            return await self._log_and_apply(fence, request_id, entry, apply, overlap)

    async def _log_and_apply(
        self,
        fence: Fence,
        request_id: str,
        entry: Callable[[], replay_pb2.ReplayEntry],
        apply: Apply[R],
        overlap: bool,
    ) -> R:
        """Step 4 under the session's lock, then the idempotent record."""
        write = asyncio.ensure_future(self._store().append(fence.session_id, self.role, [entry()], fence=fence))
        run = self._applied_while_written if overlap else self._applied_once_written
        result = await run(fence, write, apply)
        self.record(fence.session_id, request_id, result)
        return result

    async def _applied_once_written(self, fence: Fence, write: asyncio.Future, apply: Apply[R]) -> R:
        try:
            await write
        except (SessionLimitExceeded, SessionNotFound):
            raise  # refused before anything was written or applied: state and log still agree
        except BaseException:
            self.forget(fence.session_id)  # the write may have landed (reply lost), or the lease moved
            raise
        try:
            return await apply(fence)
        except BaseException:
            self.forget(fence.session_id)  # the log holds what the state may lack: rebuild on the next request
            raise

    async def _applied_while_written(self, fence: Fence, write: asyncio.Future, apply: Apply[R]) -> R:
        """The state may run ahead of the log until both have settled; any failure of either forgets it."""
        try:
            result = await apply(fence)
        except BaseException:
            try:  # settled before the lock is free: a rebuild sees the entry or never will
                await asyncio.gather(write, return_exceptions=True)
            finally:  # (even when cancelled again while waiting)
                self.forget(fence.session_id)
            raise
        try:
            await write
        except BaseException:
            self.forget(fence.session_id)  # applied but not logged (refused, lease moved, Redis down)
            raise
        return result

    async def append_logged(self, fence: Fence, entries: Sequence[replay_pb2.ReplayEntry]) -> None:
        """Log entries for state already applied (e.g. an answer once it ended); on failure the state is forgotten."""
        try:
            await self._store().append(fence.session_id, self.role, entries, fence=fence)
        except BaseException:
            self.forget(fence.session_id)  # state and log disagree now: rebuild from the log next time
            raise

    def discard(self, session_id: str) -> None:
        """Stop vouching for the local state (it is rebuilt from the log on the next request)."""
        self.epochs.pop(session_id, None)
        self.applied.pop(session_id, None)

    def forget(self, session_id: str) -> None:
        """Discard the session's record and free its local state."""
        self.discard(session_id)
        self.drop_state(session_id)
        lock = self._locks.get(session_id)
        if lock is not None and not lock.locked():
            del self._locks[session_id]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_period_s)
            try:
                await self.sweep_once()
            except Exception as e:  # Redis blip: try again next period; never kill the replica's loop
                log.warning("%s sweep failed (%s); retrying in %.0f s", self.role, e, self.sweep_period_s)

    async def sweep_once(self) -> list[str]:
        """Forget the state of sessions that ended or moved to another replica; the ids forgotten.

        A session whose lock is held is left to the next sweep: a request may be rebuilding it under a new
        epoch right now. Otherwise the state is forgotten only if it is still the one Redis was asked about
        (same epoch), so a rebuild that completed in the meantime is kept."""
        held = dict(self.epochs)
        stale = await self._store().superseded(held, self.role, self.replica_id)
        forgotten = []
        for sid in stale:
            lock = self._locks.get(sid)
            if (lock is None or not lock.locked()) and self.epochs.get(sid) == held[sid]:
                self.forget(sid)
                forgotten.append(sid)
        return forgotten
