"""Replica loss: killing the LLMCore replica that owns a session's KV, then continuing the session, gives the
same greedy continuation as a session that was never interrupted (rebuilt from the Redis replay log)."""

from __future__ import annotations

import asyncio

import pytest
import ray

from services.gateway.sessions import SessionStore
from tests.e2e.media import image_bytes, wav
from tests.e2e.test_sessions import feed_units, greedy

pytestmark = [pytest.mark.ray, pytest.mark.redis, pytest.mark.slow]


def replicas(deployment: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"#{deployment}#" in a["name"]]


def kill_all(deployment: str) -> None:
    names = replicas(deployment)
    assert names, f"no {deployment} replica found"
    for name in names:  # one replica owns every session here; with more, the owner is among them
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def lease_epoch(redis_url: str, sid: str, role: str = "llm") -> int:
    async def get() -> int:
        store = SessionStore.from_url(redis_url)
        try:
            fence = await store.lease(sid, role)
            return fence.epoch if fence else 0
        finally:
            await store.aclose()

    return asyncio.run(get())


def conversation(client, golden, on_middle=None) -> tuple[str, list[int], list[int]]:
    pcm = wav(golden, "unit_audio_2s.wav")
    frames = [image_bytes(golden, "image_unit0.png"), image_bytes(golden, "image_unit1.png")]
    sid = client.create_session().session_id
    feed_units(client, sid, pcm, frames)
    first = client.respond(sid, greedy(6)).token_ids
    if on_middle is not None:
        on_middle(sid)
    feed_units(client, sid, pcm[::-1].copy(), frames)
    client.append(sid, text="Go on.")
    second = client.respond(sid, greedy(10)).token_ids
    return sid, first, second


def test_killed_llm_owner_continues_identically(served, client, golden):
    ref_sid, ref_first, ref_second = conversation(client, golden)
    client.close_session(ref_sid)
    epochs = {}

    def kill_owner(sid: str) -> None:
        epochs["before"] = lease_epoch(served.redis_url, sid)
        kill_all("LLMCore")

    sid, first, second = conversation(client, golden, on_middle=kill_owner)
    assert first == ref_first
    assert second == ref_second
    assert lease_epoch(served.redis_url, sid) > epochs["before"]  # a new replica took the session over
    client.close_session(sid)


def test_killed_audio_owner_continues_identically(served, client, golden):
    """The streaming Whisper state is rebuilt from the logged chunks: later units encode as if nothing happened."""
    ref_sid, ref_first, ref_second = conversation(client, golden)
    client.close_session(ref_sid)
    epochs = {}

    def kill_owner(sid: str) -> None:
        epochs["before"] = lease_epoch(served.redis_url, sid, "audio")
        kill_all("AudioEncoder")

    sid, first, second = conversation(client, golden, on_middle=kill_owner)
    assert (first, second) == (ref_first, ref_second)
    assert lease_epoch(served.redis_url, sid, "audio") > epochs["before"]
    client.close_session(sid)
