"""Session state against a real redis-server: the gateway's records (owner, turns with the answer lease, live
input) and the stages' half (leases with fencing, per-role replay logs, limits), TTL expiry, cleanup."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from protos.minicpmo.v1 import replay_pb2
from services.app.redis_server import RedisServer
from services.gateway.auth import PermissionDenied, key_hash
from services.gateway.sessions import InvalidTurn, LiveInput, SessionQuotaExceeded, SessionRecords, StaleLiveInput
from services.runtime.errors import InvalidArgument
from services.runtime.ownership import (
    Fence,
    LeaseLost,
    OwnershipStore,
    SessionLimitExceeded,
    SessionNotFound,
    StoreUnavailable,
)
from tests.servers import redis_server, redis_url  # noqa: F401  (real redis-server fixtures)

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

ALICE, BOB = key_hash("alice"), key_hash("bob")


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def records(redis_url):  # noqa: F811
    r = SessionRecords.from_url(redis_url, ttl_s=30, answer_lease_s=0.5)
    yield r
    await r.aclose()


@pytest.fixture
async def store(redis_url):  # noqa: F811
    s = OwnershipStore.from_url(redis_url, ttl_s=30, max_tokens=100, max_entries=5, max_bytes=10_000)
    yield s
    await s.aclose()


def entry(tokens: int, payload: bytes = b"", rid: str = "") -> replay_pb2.ReplayEntry:
    """A replay entry of `tokens` LLM positions whose embeddings tensor carries `payload` (to tell entries apart)."""
    e = replay_pb2.ReplayEntry(request_id=rid, llm_tokens=tokens)
    e.prefill.embeddings.data = payload
    return e


async def wait_until(predicate, timeout_s: float = 10.0) -> None:
    """Poll an async predicate with back-off until it holds (bounded): no fixed sleeps."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


async def test_create_get_and_ownership(records):
    rec = await records.create(ALICE, mode="omni", language="en", options={"speech": True})
    got = await records.get(rec.session_id)
    assert got == rec
    assert (got.owner, got.mode, got.language, got.turn, got.tokens) == (ALICE, "omni", "en", "idle", 0)
    assert got.options == {"speech": True} and got.ttl_s == 30 and got.created_at == got.updated_at
    assert (await records.get_owned(rec.session_id, ALICE)) == rec
    with pytest.raises(PermissionDenied):
        await records.get_owned(rec.session_id, BOB)
    with pytest.raises(SessionNotFound):
        await records.get("no-such-session")


async def test_explicit_id_is_never_overwritten(records):
    await records.create(ALICE, "chat", "en", session_id="fixed")
    with pytest.raises(InvalidArgument, match="already exists"):
        await records.create(BOB, "chat", "zh", session_id="fixed")
    assert (await records.get("fixed")).owner == ALICE


async def test_every_key_shares_the_ttl_and_an_idle_session_expires_whole(redis_url):  # noqa: F811
    records = SessionRecords.from_url(redis_url, ttl_s=1)
    store = OwnershipStore.from_url(redis_url, ttl_s=1)
    try:
        sid = (await records.create(ALICE, "omni", "en")).session_id
        llm = await store.acquire(sid, "llm", "r1")
        await store.acquire(sid, "audio", "a1")
        await store.append(sid, "llm", [entry(3)], fence=llm)
        await records.save_input(sid, LiveInput(np.ones(10, np.float32), b"jpeg", 2), start_turn=False)
        present = [k for k in records.keys(sid) if await records.client.exists(k)]
        assert len(present) == 5  # record, live input, llm log and lease, audio lease
        ttls = [await records.client.pttl(k) for k in present]
        assert all(0 < t <= 1000 for t in ttls)
        assert await store.touch(sid)

        async def all_gone() -> bool:
            return not await records.client.exists(*records.keys(sid))

        await wait_until(all_gone, timeout_s=10)
        assert not await store.touch(sid)
        assert await store.superseded({sid: 1}, "llm", "r1") == {sid}  # a replica's sweep drops its state
        with pytest.raises(SessionNotFound):
            await store.acquire(sid, "llm", "r1")
        with pytest.raises(SessionNotFound):
            await store.append(sid, "llm", [entry(1)])
        with pytest.raises(SessionNotFound):
            await records.save_input(sid, LiveInput(), start_turn=True)
        assert not await records.client.exists(*records.keys(sid))  # nothing was recreated by the refused calls
    finally:
        await records.aclose()
        await store.aclose()


async def test_lease_acquire_renew_steal_and_fencing(records, store):
    sid = (await records.create(ALICE, "omni", "en")).session_id
    a1 = await store.acquire(sid, "llm", "replica-A")
    assert (a1.epoch, a1.took_over) == (1, True)
    renew = await store.acquire(sid, "llm", "replica-A")
    assert (renew.epoch, renew.took_over) == (1, False)
    assert await store.check(a1)
    await store.append(sid, "llm", [entry(10, b"sys")], fence=a1)

    b = await store.acquire(sid, "llm", "replica-B")  # the router moved the session: B takes over
    assert (b.epoch, b.took_over) == (2, True)
    assert not await store.check(a1) and await store.check(b)
    with pytest.raises(LeaseLost):
        await store.require(a1)
    with pytest.raises(LeaseLost, match="refused"):
        await store.append(sid, "llm", [entry(5, b"stale")], fence=a1)
    with pytest.raises(LeaseLost):
        await store.rewrite(sid, a1, [])
    assert not await store.release(a1)  # a stale owner cannot release the new owner's lease
    await store.append(sid, "llm", [entry(5, b"fresh")], fence=b)
    assert [e.prefill.embeddings.data for e in await store.log(sid, "llm")] == [b"sys", b"fresh"]

    # A comes back (e.g. the router sent the session back): new epoch, so A knows its own state is stale
    a3 = await store.acquire(sid, "llm", "replica-A")
    assert (a3.epoch, a3.took_over) == (3, True)
    assert await store.lease(sid, "llm") == Fence(sid, "llm", "replica-A", 3)

    # release keeps the epoch counter: the next owner never reuses an old epoch
    assert await store.release(a3)
    assert await store.lease(sid, "llm") is None
    assert (await store.acquire(sid, "llm", "replica-A")).epoch == 4
    # roles are independent, and each has its own log
    audio = await store.acquire(sid, "audio", "audio-1")
    assert audio.epoch == 1
    await store.append(sid, "audio", [entry(0, b"pcm")], fence=audio)
    assert [e.prefill.embeddings.data for e in await store.log(sid, "audio")] == [b"pcm"]
    assert len(await store.log(sid, "llm")) == 2
    with pytest.raises(InvalidArgument):
        await store.acquire(sid, "tts", "x")


async def test_concurrent_takeover_has_one_winner_per_epoch(records, store):
    sid = (await records.create(ALICE, "omni", "en")).session_id
    fences = await asyncio.gather(*(store.acquire(sid, "llm", f"r{i}") for i in range(8)))
    assert sorted(f.epoch for f in fences) == list(range(1, 9))
    valid = [f for f in fences if await store.check(f)]
    assert len(valid) == 1 and valid[0].epoch == 8


async def test_replay_log_round_trip_limits_and_rewrite(records, store):
    sid = (await records.create(ALICE, "omni", "en")).session_id
    fence = await store.acquire(sid, "llm", "r")
    entries = [entry(40, b"\x00\x01binary", "req-1"), entry(30, b"u" * 100, "req-2")]
    counters = await store.append(sid, "llm", entries, fence=fence)
    assert (counters.tokens, counters.entries) == (70, 2)
    assert counters.bytes == sum(len(e.SerializeToString()) for e in entries)
    assert await store.log(sid, "llm") == entries
    assert (await records.get(sid)).tokens == 70

    with pytest.raises(SessionLimitExceeded, match="tokens limit \\(70 used of 100\\)"):
        await store.append(sid, "llm", [entry(20), entry(11)], fence=fence)
    assert (await records.get(sid)).tokens == 70 and len(await store.log(sid, "llm")) == 2  # all-or-nothing
    with pytest.raises(SessionLimitExceeded, match="bytes"):
        await store.append(sid, "llm", [entry(1, b"x" * 10_000)], fence=fence)
    await store.append(sid, "llm", [entry(1), entry(1), entry(1)], fence=fence)
    with pytest.raises(SessionLimitExceeded, match="entries"):
        await store.append(sid, "llm", [entry(1)], fence=fence)

    # a context-window trim rewrites the whole log and its counters, fenced
    kept = [entries[0], entry(5, b"short")]
    counters = await store.rewrite(sid, fence, kept)
    assert (counters.tokens, counters.entries) == (45, 2)
    assert await store.log(sid, "llm") == kept and (await records.get(sid)).tokens == 45
    with pytest.raises(InvalidArgument):
        await store.append(sid, "llm", [])
    with pytest.raises(SessionNotFound):
        await store.log("unknown", "llm")


async def test_turns_and_the_answer_lease(records):
    sid = (await records.create(ALICE, "omni", "en")).session_id
    assert await records.save_input(sid, LiveInput(), start_turn=True) == "idle"
    assert await records.save_input(sid, LiveInput(version=1), start_turn=True) == "user_turn"
    assert await records.begin_answer(sid, "a1") == "user_turn"
    with pytest.raises(InvalidTurn, match="Interrupt") as first:
        await records.begin_answer(sid, "a2")  # the answer a1 is running
    with pytest.raises(InvalidTurn) as same:
        await records.save_input(sid, LiveInput(version=2), start_turn=True)
    assert first.value.lease_deadline is not None and same.value.lease_deadline == first.value.lease_deadline
    assert await records.heartbeat(sid, "a1") and not await records.heartbeat(sid, "a2")
    with pytest.raises(InvalidTurn) as renewed:  # a refusal after a heartbeat shows a1 alive: a later deadline
        await records.begin_answer(sid, "a2")
    assert renewed.value.lease_deadline > first.value.lease_deadline
    assert await records.end_answer(sid, "a1", "answered")
    assert (await records.get(sid)).turn == "answered"
    assert not await records.end_answer(sid, "a1", "interrupted")  # it no longer holds the turn

    # an answer whose gateway died stops heart-beating: after its lease the turn is taken over
    assert await records.begin_answer(sid, "dead") == "answered"

    async def lease_ran_out() -> bool:
        try:
            return await records.begin_answer(sid, "next") == "answering"
        except InvalidTurn:
            return False

    await wait_until(lease_ran_out, timeout_s=5)
    assert not await records.heartbeat(sid, "dead") and not await records.end_answer(sid, "dead", "answered")
    # Interrupt always clears the turn, whoever holds it
    assert await records.interrupt(sid)
    assert (await records.get(sid)).turn == "interrupted" and not await records.interrupt(sid)
    with pytest.raises(SessionNotFound):
        await records.begin_answer("gone", "x")


async def test_live_input_round_trip(records):
    sid = (await records.create(ALICE, "omni", "en")).session_id
    live = LiveInput(np.linspace(-1, 1, 8000, dtype=np.float32), b"\x89PNG frame", 7)
    await records.save_input(sid, live, start_turn=False)
    record, loaded = await records.load(sid)
    np.testing.assert_array_equal(loaded.pending_pcm, live.pending_pcm)
    assert (loaded.pending_frame, loaded.units, record.turn) == (live.pending_frame, 7, "idle")
    await records.save_input(sid, LiveInput(version=loaded.version), start_turn=False)
    _, empty = await records.load(sid)
    assert (empty.pending_pcm.size, empty.pending_frame, empty.units, empty.version) == (0, None, 0, 2)


async def test_live_input_is_written_only_over_the_version_last_read(records):
    """Two gateway replicas that loaded the same version: the first write wins, the second (a copy that is now
    stale) is refused whole, its turn change included."""
    sid = (await records.create(ALICE, "omni", "en")).session_id
    (_, a), (_, b) = await records.load(sid), await records.load(sid)
    assert a.version == b.version == 0
    a.units, b.units = 1, 5
    await records.save_input(sid, a, start_turn=False)
    with pytest.raises(StaleLiveInput, match="another gateway replica"):
        await records.save_input(sid, b, start_turn=True)
    record, stored = await records.load(sid)
    assert (stored.units, stored.version, record.turn) == (1, 1, "idle")
    assert await records.save_input(sid, stored, start_turn=True) == "idle"  # a fresh copy writes on


async def test_delete_removes_every_key(records, store):
    sid = (await records.create(ALICE, "omni", "en")).session_id
    await store.acquire(sid, "llm", "r")
    await store.acquire(sid, "audio", "a")
    await store.append(sid, "llm", [entry(3)])
    await records.save_input(sid, LiveInput(np.ones(4, np.float32), None, 1), start_turn=True)
    other = (await records.create(BOB, "chat", "en")).session_id
    assert await records.delete(sid, ALICE)
    remaining = {k.decode() for k in await records.client.keys("*")}
    assert remaining == {records.keys(other)[0]}
    assert not await records.delete(sid, ALICE)
    assert await records.missing([sid, other]) == {sid}


async def test_a_key_holds_at_most_its_quota_of_live_sessions(records):
    """Claims past the quota are refused (concurrent ones too), a deleted or expired session frees its place, and
    another key's quota is its own."""
    sids = [(await records.create(ALICE, "omni", "en")).session_id for _ in range(5)]
    results = await asyncio.gather(*(records.claim(ALICE, sid, 2) for sid in sids), return_exceptions=True)
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 3 and all(isinstance(r, SessionQuotaExceeded) for r in refused)
    assert "holds 2 live sessions, its quota" in str(refused[0])
    claimed = [sid for sid, r in zip(sids, results) if r is None]
    waiting = [sid for sid, r in zip(sids, results) if r is not None]
    bob = (await records.create(BOB, "omni", "en")).session_id
    await records.claim(BOB, bob, 2)  # another key

    await records.delete(claimed[0], ALICE)  # closed: its place is free at once
    await records.claim(ALICE, waiting[0], 2)
    with pytest.raises(SessionQuotaExceeded):
        await records.claim(ALICE, waiting[1], 2)
    await records.client.delete(*records.keys(claimed[1]))  # expired (Redis dropped its keys): pruned at the claim
    await records.claim(ALICE, waiting[1], 2)
    held = {m.decode() for m in await records.client.zrange(records.owned_sessions_key(ALICE), 0, -1)}
    assert held == {waiting[0], waiting[1]}


async def test_concurrent_sessions_are_isolated(records, store):
    async def drive(i: int) -> tuple[str, list[bytes]]:
        sid = (await records.create(key_hash(f"k{i}"), "omni", "en")).session_id
        fence = await store.acquire(sid, "llm", f"replica-{i % 3}")
        for j in range(4):
            await store.append(sid, "llm", [entry(1, f"{i}:{j}".encode())], fence=fence)
        await records.save_input(sid, LiveInput(), start_turn=True)
        return sid, [f"{i}:{j}".encode() for j in range(4)]

    results = await asyncio.gather(*(drive(i) for i in range(12)))
    for i, (sid, expected) in enumerate(results):
        rec = await records.get(sid)
        assert rec.owner == key_hash(f"k{i}") and rec.tokens == 4 and rec.turn == "user_turn"
        assert [e.prefill.embeddings.data for e in await store.log(sid, "llm")] == expected
        assert (await store.lease(sid, "llm")).replica_id == f"replica-{i % 3}"


async def test_redis_loss_is_a_retryable_error_not_a_hang():
    with RedisServer().start() as server:
        records = SessionRecords.from_url(server.url)
        store = OwnershipStore.from_url(server.url)
        try:
            sid = (await records.create(ALICE, "omni", "en")).session_id
            fence = await store.acquire(sid, "llm", "r")
            server.stop()
            started = time.monotonic()
            for call in (
                records.get(sid),
                records.save_input(sid, LiveInput(), start_turn=True),
                store.acquire(sid, "llm", "r"),
                store.append(sid, "llm", [entry(1)], fence=fence),
                store.log(sid, "llm"),
                store.superseded({sid: fence.epoch}, "llm", "r"),
            ):
                with pytest.raises(StoreUnavailable, match="unreachable"):
                    await call
            assert time.monotonic() - started < 30
            assert not await records.healthy()
        finally:
            await records.aclose()
            await store.aclose()


async def test_a_persistent_server_keeps_sessions_across_a_restart(tmp_path):
    with RedisServer(tmp_path / "redis", persistent=True).start() as server:
        records = SessionRecords.from_url(server.url)
        store = OwnershipStore.from_url(server.url)
        try:
            sid = (await records.create(ALICE, "omni", "en")).session_id
            fence = await store.acquire(sid, "llm", "r")
            await store.append(sid, "llm", [entry(3, b"kept")], fence=fence)
            server.restart()
            assert (await records.get(sid)).tokens == 3  # the clients reconnect by themselves
            assert [e.prefill.embeddings.data for e in await store.log(sid, "llm")] == [b"kept"]
            assert await store.check(fence)
        finally:
            await records.aclose()
            await store.aclose()
