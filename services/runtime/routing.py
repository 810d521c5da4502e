"""Session-affinity request routing for Ray Serve 2.60: every request of a session goes to ONE replica.

Why a custom router (DESIGN.md "Sessions and state", measured on Ray Serve 2.60): model multiplexing is only a
cache hint (most sessions got split across replicas under load), while a router that offers exactly one replica
per session, without ``FIFOMixin`` (which hands a freed replica to whatever request is first in line) and with
back-off while that replica is busy, never split a session. The owner is chosen from the replica's RANK, which
Serve keeps stable for a replica and hands to the replacement of a dead one; so when a replica dies, only its
sessions move, exactly once, to its replacement.

How the owner is chosen
    Rank slots are ``0 .. n-1`` (``n`` = highest rank seen + 1). A session's slot is the highest-random-weight
    (rendezvous) hash of ``(session_id, slot)`` over the slots: all routers (every gateway replica) compute the
    same answer without talking to each other, and changing ``n`` only moves the sessions whose winning slot
    appeared or vanished (modulo hashing would reshuffle almost all of them).
    If the slot's replica is alive the request is offered to it alone (busy -> Serve backs off and asks again).
    If the slot has no live replica (its replica died and Serve is starting the replacement, which inherits the
    rank), the request WAITS for up to ``missing_rank_patience_s``; past that the slot is treated as gone
    (scale-down) and the session goes to the rendezvous winner among the live ranks. Trailing slots missing
    longer than the patience are dropped from ``n`` (ranks are compacted after a scale-down).
    Choosing the patience: longer than a replica restart (keeps "moves exactly once"), shorter than what a
    caller may wait.
    Sticky keys (``sticky_idle_s`` > 0): a key keeps the replica it was last routed to while that replica lives
    and the key is used at least every ``sticky_idle_s``, even when a scale-up makes another rank its rendezvous
    winner. This is for state that exists only in the replica and cannot be rebuilt elsewhere, an utterance being
    spoken. Without it, a scale-up of ``TTSDecoder`` mid-answer sends ~1/n of the answers' text pushes to a
    replica that never saw their ``Speak`` (whose stream then waits for text that went elsewhere), and ~1/n of
    ``Vocoder`` chunks to a fresh stream (losing the held tail of the cross-fade). The map is this router's own,
    so it fits keys whose calls all come from one process, as an utterance's do (its answer's gateway replica;
    its TTSDecoder replica for the Vocoder). Sessions whose state is in Redis are not sticky: their calls come
    from every gateway replica, and routers that answered differently would split them.
    Requests without a session id are offered every replica (least-loaded wins, as default).
    The router does not read Redis: who serves is decided here; the Redis lease (``services.gateway.sessions``)
    records who HOLDS the state, with a fencing epoch, so a replica that gets a session it did not build
    rebuilds it from the replay log, and a replica that lost it can never write stale state.

Public API
----------
``SessionAffinityRouter``: the ``RequestRouter`` subclass (kwargs via ``request_router_kwargs``:
    ``missing_rank_patience_s`` (default 30.0), ``sticky_idle_s`` (default 0: off)); usable by path
    ``"services.runtime.routing:SessionAffinityRouter"``.
    A deployment that does not publish ranks still gets one replica per session (rendezvous over replica ids,
    with a warning), but then a dead replica's replacement also takes ~1/n of the other sessions.
``owner_rank(session_id, ranks) -> rank``: the pure rendezvous choice. ``RankSlots``: the pure slot bookkeeping
    (``owner(session_id, live_ranks, now) -> rank | None``). ``StickyKeys``: the pure sticky map.
``SessionAffinityReplica``: mixin for the routed deployment classes (LLMCore, AudioEncoder): publishes the
    replica's rank through ``record_routing_stats`` (refreshed, follows rank changes) and
    ``record_replica_metadata`` (available the moment the replica is ready). Adds nothing else.
``affinity_router_config(**overrides) -> RequestRouterConfig``: the config to pass as
    ``@serve.deployment(request_router_config=...)`` (router class, 1 s stats period, short back-off).
Callers route a request with ``handle.options(session_id=sid).method.remote(...)``; the id arrives in
``pending_request.metadata.session_id``. The same router works on the ingress: Serve's gRPC proxy copies a
client's ``session_id`` invocation-metadata entry into that field, so with this router on the ``Gateway``
deployment every RPC of a live session reaches the one gateway replica holding its in-memory TDM muxer. Calls in flight on a replica that dies fail with ``ActorDiedError`` and
Serve does not retry them: the caller retries (idempotently) and the retry lands on the session's new owner.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, TypeVar

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import RayServeException
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

RANK_KEY = "rank"
T = TypeVar("T", int, str)
logger = logging.getLogger("ray.serve")


def owner_rank(session_id: str, ranks: Iterable[T]) -> T:
    """Rendezvous (highest-random-weight) choice of a rank for a session: stable, uniform, minimal movement."""
    return max(ranks, key=lambda r: (hashlib.blake2b(f"{session_id}\x00{r}".encode(), digest_size=8).digest(), r))


def _published_rank(replica: RunningReplica) -> int | None:
    # routing_stats are refreshed every period (they follow a rank reassignment); replica_metadata is captured
    # once when the replica becomes ready, so it covers the first period before any stats arrive.
    for source in (replica.routing_stats, replica.replica_metadata):
        rank = source.get(RANK_KEY)
        if isinstance(rank, int):
            return rank
    return None


class RankSlots:
    """Pure bookkeeping of which rank owns a session, given the ranks alive at each moment (no Ray, no I/O)."""

    def __init__(self, missing_rank_patience_s: float = 30.0) -> None:
        self.patience_s = float(missing_rank_patience_s)
        self.n_slots = 0
        self._missing_since: dict[int, float] = {}

    def _update(self, live: set[int], now: float) -> None:
        self.n_slots = max(self.n_slots, max(live) + 1)
        for slot in range(self.n_slots):
            if slot in live:
                self._missing_since.pop(slot, None)
            else:
                self._missing_since.setdefault(slot, now)
        # trailing slots gone longer than the patience: the deployment shrank
        while self.n_slots - 1 not in live and now - self._missing_since[self.n_slots - 1] > self.patience_s:
            self._missing_since.pop(self.n_slots - 1)
            self.n_slots -= 1

    def owner(self, session_id: str, live: set[int], now: float) -> int | None:
        """The live rank that serves ``session_id``, or None to wait for a missing rank's replacement."""
        if not live:
            return None
        self._update(live, now)
        slot = owner_rank(session_id, range(self.n_slots))
        if slot in live:
            return slot
        if now - self._missing_since[slot] <= self.patience_s:
            return None
        return owner_rank(session_id, live)


class StickyKeys:
    """Pure bookkeeping of the replica each key was last routed to, kept while the key is in use: an entry not
    used for ``idle_s`` expires (oldest first, so the map holds only the keys of the last ``idle_s``)."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = float(idle_s)
        self._last: OrderedDict[str, tuple[str, float]] = OrderedDict()  # key -> (replica id, last used), oldest first

    def get(self, key: str, now: float) -> str | None:
        self._expire(now)
        held = self._last.get(key)
        return held[0] if held is not None else None

    def put(self, key: str, replica_id: str, now: float) -> None:
        self._last[key] = (replica_id, now)
        self._last.move_to_end(key)
        self._expire(now)

    def __len__(self) -> int:
        return len(self._last)

    def _expire(self, now: float) -> None:
        while self._last and now - next(iter(self._last.values()))[1] > self.idle_s:
            self._last.popitem(last=False)


class SessionAffinityRouter(RequestRouter):
    def initialize_state(
        self, missing_rank_patience_s: float = 30.0, sticky_idle_s: float = 0.0, **kwargs: Any
    ) -> None:
        self._slots = RankSlots(missing_rank_patience_s)
        self._sticky = StickyKeys(sticky_idle_s) if sticky_idle_s > 0 else None
        self._warned_no_ranks = False

    def owner(self, session_id: str, candidates: list[RunningReplica]) -> RunningReplica | None:
        """The one replica that serves ``session_id`` now, or None while its rank's replacement is starting."""
        if self._sticky is None:
            return self._rendezvous_owner(session_id, candidates)
        now = time.monotonic()
        held = self._sticky.get(session_id, now)
        chosen = next((r for r in candidates if r.replica_id.unique_id == held), None) if held else None
        chosen = chosen or self._rendezvous_owner(session_id, candidates)
        if chosen is not None:
            self._sticky.put(session_id, chosen.replica_id.unique_id, now)
        return chosen

    def _rendezvous_owner(self, session_id: str, candidates: list[RunningReplica]) -> RunningReplica | None:
        live: dict[int, RunningReplica] = {}
        for replica in sorted(candidates, key=lambda r: r.replica_id.unique_id):
            rank = _published_rank(replica)
            if rank is not None and rank not in live:  # two claimants during a reassignment: keep one, stably
                live[rank] = replica
        if live:
            rank = self._slots.owner(session_id, set(live), time.monotonic())
            return None if rank is None else live[rank]
        if not candidates:
            return None
        # The deployment publishes no ranks (no SessionAffinityReplica mixin): still one replica per session, by
        # rendezvous over replica ids; but a dead replica's sessions then move to the survivors, and about 1/n of
        # all sessions move again when its replacement (a new id) appears.
        if not self._warned_no_ranks:
            self._warned_no_ranks = True
            logger.warning(
                "%s replicas publish no rank; routing sessions by replica id. Mix SessionAffinityReplica into "
                "the deployment class so a dead replica's sessions move once, to its replacement.",
                self._deployment_id,
            )
        by_id = {r.replica_id.unique_id: r for r in candidates}
        return by_id[owner_rank(session_id, by_id)]

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        session_id = pending_request.metadata.session_id if pending_request is not None else ""
        if pending_request is not None:
            # Without this flag the base loop re-asks immediately (a busy spin) when our one replica is busy.
            pending_request.routing_context.should_backoff = True
        if not session_id:
            return [candidate_replicas]
        chosen = self.owner(session_id, candidate_replicas)
        return [[chosen]] if chosen is not None else []


class SessionAffinityReplica:
    """Mixin for deployments routed by ``SessionAffinityRouter``: publishes this replica's rank."""

    def record_routing_stats(self) -> dict[str, Any]:
        return {RANK_KEY: _own_rank()}

    def record_replica_metadata(self) -> dict[str, Any]:
        return {RANK_KEY: _own_rank()}


def replica_id() -> str:
    """This replica's unique id (the lease holder's name in Redis); outside Ray Serve (a stage run in process,
    as the in-process benchmark does) one id per process."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return f"local-{os.getpid()}"


def _own_rank() -> int:
    rank = serve.get_replica_context().rank
    return rank if isinstance(rank, int) else rank.rank


def affinity_router_config(**overrides: Any) -> RequestRouterConfig:
    options: dict[str, Any] = {
        "request_router_class": SessionAffinityRouter,
        "request_router_kwargs": {},
        "request_routing_stats_period_s": 1.0,
        "initial_backoff_s": 0.005,
        "max_backoff_s": 0.1,
    }
    options.update(overrides)
    return RequestRouterConfig(**options)
