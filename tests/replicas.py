"""The served stack's replica processes: which are alive (a test can tell that none was restarted or replaced
while it ran), killing them the way a node failure does (kill -9 of the actor), and waiting for Ray Serve to
bring up their replacements."""

from __future__ import annotations

import time

import ray


def serve_actors() -> dict[str, tuple[str, int]]:
    """Live Serve actors (replicas, controller, proxies) of the Ray cluster this process is connected to:
    actor id -> (name, restarts).

    Read from the GCS actor table: `ray.util.state.list_actors` goes through the dashboard, which the test stack
    does not start. A Serve replica is never restarted in place (max_restarts 0): a crashed one is replaced by a
    new actor, so a changed id shows it as well as a restart count.
    """
    from ray._private import state

    return {
        actor_id: (info["Name"], info["NumRestarts"])
        for actor_id, info in state.actors().items()
        if info["State"] == "ALIVE" and info["Name"].startswith("SERVE_")
    }


def changes(before: dict[str, tuple[str, int]], after: dict[str, tuple[str, int]]) -> list[str]:
    """What happened to the actors between two `serve_actors` snapshots (empty: nothing)."""
    gone = [f"{name} died" for actor_id, (name, _) in before.items() if actor_id not in after]
    new = [f"{name} started" for actor_id, (name, _) in after.items() if actor_id not in before]
    restarted = [
        f"{name} restarted {after[actor_id][1] - n} time(s)"
        for actor_id, (name, n) in before.items()
        if actor_id in after and after[actor_id][1] != n
    ]
    return gone + new + restarted


def replicas(deployment: str) -> list[str]:
    """Names of the live replica actors of `deployment` (any application)."""
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"#{deployment}#" in a["name"]]


def kill_all(deployment: str) -> set[str]:
    """Kill every replica of `deployment` (one replica owns every session in the e2e stack); their names."""
    names = replicas(deployment)
    assert names, f"no {deployment} replica found"
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return set(names)


def running(deployment: str, app: str | None = None) -> int:
    """Replicas of `deployment` in `app` (None: in any application) that Serve's controller counts as RUNNING."""
    from ray import serve

    return sum(
        status.deployments[deployment].replica_states.get("RUNNING", 0)
        for name, status in serve.status().applications.items()
        if app in (None, name) and deployment in status.deployments
    )


def wait_for_replacement(deployment: str, old: set[str], timeout_s: float = 120.0) -> float:
    """Seconds until replicas of `deployment` that are not in `old` run in their place: started, and RUNNING in
    Serve's view (constructed and passing health checks), as many as were killed (polling the actor table and the
    controller)."""
    started = time.monotonic()
    while len(set(replicas(deployment)) - old) < len(old) or running(deployment) < len(old):
        assert time.monotonic() - started < timeout_s, f"no replacement {deployment} replica"
        time.sleep(0.1)  # polling Ray's actor table and Serve's status
    return time.monotonic() - started
