"""Continuous batching: which tokens of which sessions go into the next forward pass.

Each session has a FIFO of requests (a prefill, or a generate = prefill of the assistant prefix then one decode
token per step); only the head request of a session runs, so a session's inputs enter its KV in order. Every
step takes the decode token of every answering session first (they are latency-bound and cost one token each),
then fills the rest of `max_batch_tokens` with prefill chunks in arrival order (chunked prefill: a long prompt
is split across steps so it never stalls the decoders for long).

KV is reserved here, before the forward pass (the allocator may decide to move a growing session's run; the engine
applies those copies before the forward), and committed by the engine after it. A request that creates its session
brings the session's `Reservation` (admission: the run it is promised, and the headroom that must stay free). When
the arena is full, idle sessions (no queued work, none scheduled for `evict_after_s`) are evicted least-recently-used
first if `evict_idle`; the caller rebuilds them from their replay log. If there is still no room, the request fails
with `EngineFullError`.

Pure bookkeeping (no tensors): the request payload is opaque here.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.llm_core.engine.kv_cache import NO_RESERVATION, EngineFullError, KVAllocator, Reservation
from services.runtime.errors import FailedPrecondition, ResourceExhausted


class SessionStateError(FailedPrecondition, KeyError):
    """The session's KV is not what the caller expects (evicted, dropped, or never created): rebuild it."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ContextLengthError(ResourceExhausted, ValueError):
    """The session would grow past the longest KV the engine serves for one session."""


EXISTING = -1
"""`expected_kv_len` of a request for a session that must already hold KV, of whatever length (the caller's other
requests may be growing it): the engine may evict an idle session at any time, and a request that found it gone
would otherwise start the session over with none of its context."""


@dataclass(eq=False)
class Request:
    session_id: str
    prompt_len: int  # rows of inputs_embeds to prefill
    decode: bool  # after the prompt, decode one token per step until the engine finishes it
    seq: int  # arrival order
    expected_kv_len: int | None = None  # checked when the request starts; 0 = a new session, EXISTING = any KV
    payload: Any = None
    reservation: Reservation = NO_RESERVATION  # the session's, if this request creates it
    prefilled: int = 0
    started: bool = False
    stopping: bool = False  # interrupted while prefilling: finish as soon as the prompt is in
    finished: bool = False

    @property
    def prefilling(self) -> bool:
        return self.prefilled < self.prompt_len


@dataclass
class PrefillChunk:
    request: Request
    start: int  # offset in the request's prompt
    n: int
    kv_start: int  # the session's KV position of the chunk's first row

    @property
    def last(self) -> bool:
        return self.start + self.n == self.request.prompt_len


@dataclass
class ScheduledBatch:
    decodes: list[Request] = field(default_factory=list)  # each adds one row at KV position kv_len(session)
    prefills: list[PrefillChunk] = field(default_factory=list)
    failed: list[tuple[Request, Exception]] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.n for c in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(
        self,
        kv: KVAllocator,
        max_batch_tokens: int,
        max_session_tokens: int,
        evict_idle: bool = True,
        evict_after_s: float = 0.0,
    ):
        if max_batch_tokens <= 0:
            raise ValueError(f"max_batch_tokens must be > 0, got {max_batch_tokens}")
        self.kv = kv
        self.max_batch_tokens = max_batch_tokens
        self.max_session_tokens = max_session_tokens
        self.evict_idle = evict_idle
        self.evict_after_s = evict_after_s  # a session used more recently is not evicted: it is likely live
        self._queues: dict[str, deque[Request]] = {}
        self._seq = itertools.count()
        self.evictions = 0

    # --- requests ---------------------------------------------------------------------------------------------

    def add(
        self,
        session_id: str,
        prompt_len: int,
        decode: bool,
        payload: Any = None,
        expected_kv_len: int | None = None,
        reservation: Reservation = NO_RESERVATION,
    ) -> Request:
        if prompt_len <= 0 and not decode:
            raise ValueError("a prefill needs at least one input row")
        if prompt_len <= 0 and decode:
            raise ValueError("generate needs at least one row of assistant prefix to predict from")
        req = Request(session_id, prompt_len, decode, next(self._seq), expected_kv_len, payload, reservation)
        self._queues.setdefault(session_id, deque()).append(req)
        return req

    def has_work(self) -> bool:
        return bool(self._queues)

    def queued(self, session_id: str) -> list[Request]:
        return list(self._queues.get(session_id, ()))

    def head(self, session_id: str) -> Request | None:
        q = self._queues.get(session_id)
        return q[0] if q else None

    def is_idle(self, session_id: str) -> bool:
        return session_id not in self._queues

    def stats(self) -> dict[str, int]:
        heads = [q[0] for q in self._queues.values()]
        return {
            "decoding": sum(1 for r in heads if r.decode and not r.prefilling),
            "prefilling": sum(1 for r in heads if r.prefilling and r.started),
            "waiting": sum(len(q) for q in self._queues.values()) - sum(1 for r in heads if r.started),
        }

    # --- one step ---------------------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        heads = sorted((q[0] for q in self._queues.values()), key=lambda r: r.seq)
        for r in heads:
            if r.decode and not r.prefilling and not r.finished:
                if len(batch.decodes) >= self.max_batch_tokens:
                    break
                if self._reserve(r, 1, batch):
                    batch.decodes.append(r)
        budget = self.max_batch_tokens - len(batch.decodes)
        for r in heads:
            if budget <= 0:
                break
            if not r.prefilling or r.finished:
                continue
            if not r.started and not self._start(r, batch):
                continue
            n = min(r.prompt_len - r.prefilled, budget)
            if self._reserve(r, n, batch):
                batch.prefills.append(PrefillChunk(r, r.prefilled, n, self.kv.num_tokens(r.session_id)))
                budget -= n
        return batch

    def _start(self, r: Request, batch: ScheduledBatch) -> bool:
        """First scheduling of a request: check what the caller expects, create the session's KV if new."""
        sid = r.session_id
        have = self.kv.num_tokens(sid) if self.kv.has(sid) else None
        want = r.expected_kv_len
        error: Exception | None = None
        if want is not None and (have is None if want == EXISTING else want != (have or 0)):
            if have is None:
                error = SessionStateError(
                    f"session {sid!r} has no KV on this replica (evicted, dropped or never created); "
                    f"rebuild it from its replay log"
                )
            else:
                error = SessionStateError(
                    f"session {sid!r} holds {have} KV tokens, caller expected {r.expected_kv_len}"
                )
        elif (have or 0) + r.prompt_len > self.max_session_tokens:
            error = ContextLengthError(
                f"session {sid!r} would hold {(have or 0) + r.prompt_len} tokens, over the limit of "
                f"{self.max_session_tokens}; start a new session"
            )
        if error is None and have is None:
            self._evict_until(lambda: self.kv.can_create(r.reservation), sid, batch)
            try:
                self.kv.create(sid, r.reservation)
            except EngineFullError as e:
                error = e
        if error is not None:
            batch.failed.append((r, error))
            self.finish(r)
            return False
        r.started = True
        return True

    def _reserve(self, r: Request, n: int, batch: ScheduledBatch) -> bool:
        sid = r.session_id
        self._evict_until(lambda: self.kv.blocks_needed(sid, n) <= self.kv.free_blocks, sid, batch)
        try:
            self.kv.reserve(sid, n)
        except EngineFullError as e:
            batch.failed.append((r, e))
            self.finish(r)
            return False
        return True

    def _evict_until(self, fits: Callable[[], bool], sid: str, batch: ScheduledBatch) -> None:
        """Evict idle sessions, least recently used first, until `fits()` (if `evict_idle`)."""
        if fits() or not self.evict_idle:
            return
        # a session whose work just failed this step is idle now, but evicting it would only add churn
        failed_now = {f.session_id for f, _ in batch.failed}
        for victim in self.kv.lru_order():
            if fits():
                break
            if (victim != sid and self.is_idle(victim) and victim not in failed_now
                    and self.kv.idle_s(victim) >= self.evict_after_s):  # fmt: skip
                self.kv.free(victim)
                self.evictions += 1
                batch.evicted.append(victim)

    # --- after the forward ------------------------------------------------------------------------------------

    def commit_prefill(self, chunk: PrefillChunk) -> None:
        r = chunk.request
        self.kv.commit(r.session_id, chunk.n)
        r.prefilled += chunk.n

    def commit_decode(self, r: Request) -> None:
        self.kv.commit(r.session_id, 1)

    def finish(self, r: Request) -> None:
        """Retire a head request (done, failed, interrupted). A session left empty and idle is removed."""
        r.finished = True
        sid = r.session_id
        q = self._queues.get(sid)
        if q is None or not q or q[0] is not r:
            return
        q.popleft()
        if not q:
            del self._queues[sid]
            if self.kv.has(sid) and self.kv.num_tokens(sid) == 0:
                self.kv.free(sid)

    def drop(self, session_id: str) -> list[Request]:
        """Forget a session: free its KV; returns its unfinished requests (the caller fails them)."""
        pending = list(self._queues.pop(session_id, ()))
        for r in pending:
            r.finished = True
        self.kv.free(session_id)
        return pending

    def abort_all(self) -> list[Request]:
        """Retire every queued request (shutdown); sessions keep their committed KV."""
        pending = [r for q in self._queues.values() for r in q]
        for r in pending:
            r.finished = True
        self._queues.clear()
        for sid in self.kv.sessions():
            if self.kv.num_tokens(sid) == 0:
                self.kv.free(sid)
        return pending
