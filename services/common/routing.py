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
    caller may wait. Requests without a session id are offered every replica (least-loaded wins, as default).
    The router does not read Redis: who serves is decided here; the Redis lease (``services.gateway.sessions``)
    records who HOLDS the state, with a fencing epoch, so a replica that gets a session it did not build
    rebuilds it from the replay log, and a replica that lost it can never write stale state.

Public API
----------
``SessionAffinityRouter``: the ``RequestRouter`` subclass (kwargs via ``request_router_kwargs``:
    ``missing_rank_patience_s`` (default 30.0)). ``owner_rank(session_id, n_slots) -> int`` is the pure slot choice.
``SessionAffinityReplica``: mixin for the routed deployment classes (LLMCore, AudioEncoder): publishes the
    replica's rank through ``record_routing_stats`` (refreshed, follows rank changes) and
    ``record_replica_metadata`` (available the moment the replica is ready). Adds nothing else.
``affinity_router_config(**overrides) -> RequestRouterConfig``: the config to pass as
    ``@serve.deployment(request_router_config=...)`` (router class, 1 s stats period, short back-off).
Callers route a request with ``handle.options(session_id=sid).method.remote(...)``; the id arrives in
``pending_request.metadata.session_id``. Calls in flight on a replica that dies fail with ``ActorDiedError`` and
Serve does not retry them: the caller retries (idempotently) and the retry lands on the session's new owner.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

RANK_KEY = "rank"


def owner_rank(session_id: str, ranks: range | list[int] | set[int]) -> int:
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


class SessionAffinityRouter(RequestRouter):
    def initialize_state(self, missing_rank_patience_s: float = 30.0, **kwargs: Any) -> None:
        self._patience_s = float(missing_rank_patience_s)
        self._n_slots = 0
        self._missing_since: dict[int, float] = {}

    def _live_ranks(self, candidates: list[RunningReplica]) -> dict[int, RunningReplica]:
        live: dict[int, RunningReplica] = {}
        for replica in sorted(candidates, key=lambda r: r.replica_id.unique_id):
            rank = _published_rank(replica)
            if rank is not None and rank not in live:  # two claimants during a reassignment: keep one, stably
                live[rank] = replica
        return live

    def _update_slots(self, live: dict[int, RunningReplica], now: float) -> None:
        self._n_slots = max(self._n_slots, max(live) + 1)
        for slot in range(self._n_slots):
            if slot in live:
                self._missing_since.pop(slot, None)
            else:
                self._missing_since.setdefault(slot, now)
        while self._n_slots - 1 not in live and now - self._missing_since[self._n_slots - 1] > self._patience_s:
            self._missing_since.pop(self._n_slots - 1)
            self._n_slots -= 1

    def owner(self, session_id: str, candidates: list[RunningReplica]) -> RunningReplica | None:
        """The one replica that serves ``session_id`` now, or None while its rank's replacement is starting."""
        live = self._live_ranks(candidates)
        if not live:
            return None
        now = time.monotonic()
        self._update_slots(live, now)
        slot = owner_rank(session_id, range(self._n_slots))
        if slot in live:
            return live[slot]
        if now - self._missing_since[slot] <= self._patience_s:
            return None
        return live[owner_rank(session_id, set(live))]

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
