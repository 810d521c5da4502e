"""Session-affinity router on a REAL local Ray Serve: 3 replicas, 20 sessions, one replica per session; a killed
replica's sessions move exactly once (to its replacement) and no other session moves; an autoscaled scale-up
moves rendezvous keys to the new ranks but no sticky key.

The deployment here is a tiny echo (the router is pure routing logic; the model deployments use the same router
through ``affinity_router_config``). Reuses a Ray already started by the test session (F1's cluster fixture);
otherwise starts its own for this module and shuts it down after.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest
import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from services.app.serve_env import use_local_cluster_env
from services.runtime.routing import SessionAffinityReplica, affinity_router_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "routing-test"
N_REPLICAS = 3
SESSIONS = [f"session-{i:02d}" for i in range(20)]


@serve.deployment(
    num_replicas=N_REPLICAS,
    max_ongoing_requests=2,  # small, so concurrent requests find the owner busy and must back off
    ray_actor_options={"num_cpus": 0.1},
    health_check_period_s=1,
    health_check_timeout_s=5,
    request_router_config=affinity_router_config(
        request_router_kwargs={"missing_rank_patience_s": 120.0}, request_routing_stats_period_s=0.5
    ),
)
class Echo(SessionAffinityReplica):
    def __init__(self) -> None:
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id
        self.actor_name = ray.get_runtime_context().get_actor_name()

    async def __call__(self, session_id: str, hold_s: float = 0.0) -> tuple[str, str, int]:
        if hold_s:
            await asyncio.sleep(hold_s)  # simulated work so replicas are busy while others queue
        return self.replica, self.actor_name, serve.get_replica_context().rank.rank


class ReplicaEcho:
    """Answers with its replica id (and no actor name or rank)."""

    def __init__(self) -> None:
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def __call__(self, session_id: str, hold_s: float = 0.0) -> tuple[str, str, int]:
        if hold_s:
            await asyncio.sleep(hold_s)
        return self.replica, "", -1


@serve.deployment(
    num_replicas=N_REPLICAS,
    max_ongoing_requests=2,
    ray_actor_options={"num_cpus": 0.1},
    request_router_config={"request_router_class": "services.runtime.routing:SessionAffinityRouter"},
)
class RanklessEcho(ReplicaEcho):
    """Routed by the same router but without the rank-publishing mixin (the router's fallback path)."""


@pytest.fixture(scope="module")
def serve_instance():
    """Ray Serve for this module: the test session's if one is running, else our own (shut down after)."""
    started_here = not ray.is_initialized()
    if started_here:
        use_local_cluster_env()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    if started_here:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def echo_handle(serve_instance):
    handle = serve.run(Echo.bind(), name=APP, route_prefix=None)
    yield handle
    serve.delete(APP)


@pytest.fixture(scope="module")
def rankless_handle(serve_instance):
    handle = serve.run(RanklessEcho.bind(), name=APP + "-rankless", route_prefix=None)
    yield handle
    serve.delete(APP + "-rankless")


async def call(handle, session_id: str, hold_s: float = 0.0, timeout_s: float = 90.0) -> tuple[str, str, int]:
    """One session call, retried the way the gateway retries: a call caught on a dying replica fails with
    ActorDiedError and Serve does not retry it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await handle.options(session_id=session_id).remote(session_id, hold_s)
        except (ActorDiedError, ActorUnavailableError, RayActorError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def wait_for_replicas(handle, field: int, timeout_s: float = 60.0) -> None:
    """Until every replica answers, i.e. this handle's router sees them all (field 2: with its rank published);
    routing is deterministic from then on."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = {res[field] for res in await asyncio.gather(*(call(handle, s) for s in SESSIONS))}
        if len(seen) == N_REPLICAS:
            return
        assert time.monotonic() < deadline, f"only {seen} answered"
        await asyncio.sleep(0.1)


async def serve_rounds(handle, rounds: int, hold_s: float) -> dict[str, list[tuple[str, str, int]]]:
    """Every session sends ``rounds`` concurrent requests per round; returns who served each, in order."""
    served: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
    for _ in range(rounds):
        results = await asyncio.gather(*(call(handle, s, hold_s) for s in SESSIONS for _ in range(2)))
        for (sid, _), res in zip(((s, k) for s in SESSIONS for k in range(2)), results):
            served[sid].append(res)
    return served


def test_each_session_one_replica_and_a_killed_replica_moves_only_its_sessions_once(echo_handle):
    async def scenario():
        await wait_for_replicas(echo_handle, field=2)
        before = await serve_rounds(echo_handle, rounds=3, hold_s=0.02)
        owner = {}
        for sid, hits in before.items():
            assert len({replica for replica, _, _ in hits}) == 1, f"{sid} was split: {hits}"
            owner[sid] = hits[0]
        assert len({o[0] for o in owner.values()}) == N_REPLICAS  # sessions spread over every replica

        # kill the replica that owns the most sessions (by its actor)
        by_replica = defaultdict(list)
        for sid, (replica, actor_name, rank) in owner.items():
            by_replica[(replica, actor_name, rank)].append(sid)
        (victim, victim_actor, victim_rank), victim_sessions = max(by_replica.items(), key=lambda kv: len(kv[1]))
        ray.kill(ray.get_actor(victim_actor, namespace="serve"), no_restart=True)

        after = await serve_rounds(echo_handle, rounds=3, hold_s=0.02)
        for sid, hits in after.items():
            replicas = [replica for replica, _, _ in hits]
            if sid in victim_sessions:
                # moved once: every request after the kill went to one new replica, the dead one's replacement
                assert len(set(replicas)) == 1 and replicas[0] != victim, f"{sid}: {hits}"
                assert {rank for _, _, rank in hits} == {victim_rank}
            else:
                assert set(replicas) == {owner[sid][0]}, f"{sid} moved although its replica lived: {hits}"
        assert len({after[s][0][0] for s in victim_sessions}) == 1  # all of them went to the same replacement

    asyncio.run(scenario())


def test_deployment_without_ranks_still_gets_one_replica_per_session(rankless_handle):
    async def scenario():
        await wait_for_replicas(rankless_handle, field=0)
        served = await serve_rounds(rankless_handle, rounds=3, hold_s=0.02)
        for sid, hits in served.items():
            assert len({replica for replica, _, _ in hits}) == 1, f"{sid} was split: {hits}"
        assert len({hits[0][0] for hits in served.values()}) > 1  # still spread over replicas

    asyncio.run(scenario())


@serve.deployment(
    ray_actor_options={"num_cpus": 0.01},
    max_ongoing_requests=4,
    # scales 1 -> 3 as soon as requests wait (the production path of a scale-up)
    autoscaling_config={"min_replicas": 1, "initial_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
                        "upscale_delay_s": 0, "metrics_interval_s": 0.5, "look_back_period_s": 1},
)
class ScaledEcho(ReplicaEcho, SessionAffinityReplica):
    """Autoscaled from one replica to three by a burst of held requests."""


def scaled_echo(sticky_idle_s: float):
    router = affinity_router_config(request_router_kwargs={"sticky_idle_s": sticky_idle_s} if sticky_idle_s else {},
                                    request_routing_stats_period_s=0.5)  # fmt: skip
    return ScaledEcho.options(request_router_config=router).bind()


@pytest.mark.parametrize("sticky_idle_s", [0.0, 60.0])
def test_a_scale_up_moves_keys_unless_they_are_sticky(serve_instance, sticky_idle_s):
    """Keys routed while one replica ran, routed again through the same handle (router) after an autoscaled
    scale-up to three: rendezvous keys move to the new ranks they now win (a session rebuilds its state there
    from Redis); sticky keys (an utterance being spoken, whose state cannot move) stay where they were."""
    app = f"{APP}-scaled-{int(sticky_idle_s)}"
    keys = [f"utterance-{i:02d}" for i in range(20)]

    async def owners(handle, ks: list[str], hold_s: float = 0.0) -> dict[str, str]:
        return dict(zip(ks, [r[0] for r in await asyncio.gather(*(call(handle, k, hold_s) for k in ks))]))

    async def scenario(handle) -> tuple[dict[str, str], dict[str, str]]:
        before = await owners(handle, keys)
        assert len(set(before.values())) == 1
        first = next(iter(before.values()))
        deadline = time.monotonic() + 90
        burst = 0
        while True:  # held requests on fresh keys queue up until the autoscaler adds replicas and we see them all
            burst += 1
            seen = set((await owners(handle, [f"load-{burst}-{i:02d}" for i in range(24)], hold_s=0.3)).values())
            if len(seen) == 3:
                break
            assert time.monotonic() < deadline, f"no scale-up to 3 replicas: saw {seen}"
        assert first in seen, "the first replica was replaced: this was no scale-up"
        return before, await owners(handle, keys)

    try:
        handle = serve.run(scaled_echo(sticky_idle_s), name=app, route_prefix=None)
        before, after = asyncio.run(scenario(handle))
    finally:
        serve.delete(app)
    moved = [k for k in keys if after[k] != before[k]]
    if sticky_idle_s:
        assert not moved, f"sticky keys moved on a scale-up: {moved}"
    else:
        assert moved, "no rendezvous key moved to a new rank: the scale-up changed no owner"
