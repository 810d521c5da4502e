"""Replica loss: killing the replica that owns a session's state (LLM KV, streaming Whisper state), then
continuing the session, gives the same greedy continuation as a session that was never interrupted (the new
owner rebuilds it from the Redis replay log).

Retries are idempotent: a stage replica that logged a request and died before replying leaves the session
holding that request while its caller saw a failure; the caller sends the same request again. The live-session
driver itself is run here (in this process, over the deployments' real handles) with stage calls that lose
their replies on purpose, so the retry path is the production one."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from protos.minicpmo.v1 import omni_pb2, tensor_pb2
from services.client.sdk import audio_msg
from services.gateway.stages import RayStages
from services.runtime.ownership import OwnershipStore
from tests.e2e.driver import local_driver
from tests.e2e.media import image_bytes, wav
from tests.e2e.test_sessions import feed_units, greedy
from tests.replicas import kill_all, wait_for_replacement

pytestmark = [pytest.mark.ray, pytest.mark.redis, pytest.mark.slow]


def lease_epoch(redis_url: str, sid: str, role: str = "llm") -> int:
    async def get() -> int:
        store = OwnershipStore.from_url(redis_url)
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


@pytest.mark.parametrize("deployment, role", [("LLMCore", "llm"), ("AudioEncoder", "audio")])
def test_killed_owner_continues_identically(served, client, golden, deployment, role):
    ref_sid, ref_first, ref_second = conversation(client, golden)
    client.close_session(ref_sid)
    epochs = {}

    def kill_owner(sid: str) -> None:
        epochs["before"] = lease_epoch(served.redis_url, sid, role)
        kill_all(deployment)

    sid, first, second = conversation(client, golden, on_middle=kill_owner)
    assert (first, second) == (ref_first, ref_second)
    assert lease_epoch(served.redis_url, sid, role) > epochs["before"]  # a new replica took the session over
    client.close_session(sid)


class LosingReplies(RayStages):
    """The deployments' stage calls, except that while `losing`, every prefill's replies are lost once: after
    its audio chunk was encoded (and logged) the AudioEncoder replica is killed and the chunk is sent again, and
    after the prefill was applied (and logged) the LLMCore replica is killed and the prefill is sent again, as
    the gateway's retries would. Each repeat must be answered as the first time, not applied twice."""

    def __init__(self, handles: list):
        super().__init__(*handles)
        self.losing = False
        self.repeats: list[tuple[str, bool]] = []

    async def _lose(self, deployment: str) -> None:
        old = kill_all(deployment)
        await asyncio.to_thread(wait_for_replacement, deployment, old)

    async def prefill(self, request, pieces):
        if not self.losing:
            return await super().prefill(request, pieces)
        first = [await p.response for p in pieces]
        if any(e.modality == tensor_pb2.Embeddings.MODALITY_AUDIO for e in first):
            await self._lose("AudioEncoder")
            again = [await p.again() for p in pieces]
            self.repeats.append(("chunk", [e.SerializeToString() for e in first] == [e.SerializeToString() for e in again]))
        reply = await super().prefill(request, pieces)
        await self._lose("LLMCore")
        repeat = await super().prefill(request, pieces)
        self.repeats.append(("prefill", repeat.kv_len == reply.kv_len))
        return reply


async def driven_conversation(served, golden, losing: bool) -> tuple[str, list[list[int]], list, list]:
    """The driver in this process: units, an answer, more units and text, an answer."""
    pcm = wav(golden, "unit_audio_2s.wav")
    frame = image_bytes(golden, "image_unit0.png")
    async with local_driver(served, LosingReplies) as (live, caller, stages):

        async def answer(n: int) -> list[int]:
            events = [e async for e in live.respond(caller, omni_pb2.RespondRequest(session_id=sid, options=greedy(n)))]
            return list(events[-1].final.token_ids)

        sid = (await live.create(caller, omni_pb2.CreateSessionRequest())).session_id
        await live.append(caller, omni_pb2.AppendUnitRequest(session_id=sid, audio=audio_msg(pcm[:16000]),
                                                             frames=[omni_pb2.Image(data=frame)]))  # fmt: skip
        first = await answer(6)
        stages.losing = losing  # from here on every prefill's reply is lost once
        await live.append(caller, omni_pb2.AppendUnitRequest(session_id=sid, audio=audio_msg(pcm[16000:]), text="Go on."))
        stages.losing = False
        second = await answer(10)
        store = OwnershipStore.from_url(served.redis_url)
        log = await store.log(sid, "llm")
        await store.aclose()
        await live.close(caller, sid)
        return sid, [first, second], log, stages.repeats


def test_retry_after_lost_reply_is_applied_once(served, golden):
    """The "logged but not replied" window, forced on every prefill of a turn: the retry is answered from the
    new owner's rebuilt state (same KV length), the conversation continues identically, and the replay log holds
    every request once."""
    _, reference, ref_log, _ = asyncio.run(driven_conversation(served, golden, losing=False))
    _, answers, log, repeats = asyncio.run(driven_conversation(served, golden, losing=True))
    assert answers == reference
    assert {kind for kind, _ in repeats} == {"chunk", "prefill"} and all(same for _, same in repeats), repeats
    assert [e.llm_tokens for e in log] == [e.llm_tokens for e in ref_log]
    ids = Counter(e.request_id for e in log)
    assert all(n == 1 for n in ids.values())
