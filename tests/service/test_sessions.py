"""Session store against a real redis-server: record, TTL expiry, leases with fencing, replay log, cleanup."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.gateway.auth import PermissionDenied, key_hash
from services.gateway.sessions import (
    Fence,
    InvalidTurn,
    LeaseLost,
    ReplayEntry,
    SessionInputError,
    SessionLimitExceeded,
    SessionNotFound,
    SessionStore,
    StoreUnavailable,
)
from tests.servers import RedisServer, redis_server, redis_url  # noqa: F401  (real redis-server fixtures)

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

ALICE, BOB = key_hash("alice"), key_hash("bob")


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def store(redis_url):  # noqa: F811
    s = SessionStore.from_url(redis_url, ttl_s=30, max_tokens=100, max_replay_entries=5, max_replay_bytes=10_000)
    yield s
    await s.aclose()


async def wait_until(predicate, timeout_s: float = 10.0) -> None:
    """Poll an async predicate with back-off until it holds (bounded): no fixed sleeps."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


async def test_create_get_and_ownership(store):
    rec = await store.create(ALICE, mode="omni", language="en", options={"speech": True})
    got = await store.get(rec.session_id)
    assert got == rec
    assert (got.owner, got.mode, got.language, got.turn, got.tokens) == (ALICE, "omni", "en", "idle", 0)
    assert got.options == {"speech": True} and got.ttl_s == 30 and got.created_at == got.updated_at
    assert (await store.get_owned(rec.session_id, ALICE)) == rec
    with pytest.raises(PermissionDenied):
        await store.get_owned(rec.session_id, BOB)
    with pytest.raises(SessionNotFound):
        await store.get("no-such-session")


async def test_explicit_id_is_never_overwritten(store):
    await store.create(ALICE, "chat", "en", session_id="fixed")
    with pytest.raises(SessionInputError, match="already exists"):
        await store.create(BOB, "chat", "zh", session_id="fixed")
    assert (await store.get("fixed")).owner == ALICE


async def test_touch_refreshes_ttl_of_every_key_and_idle_session_expires(redis_url):  # noqa: F811
    store = SessionStore.from_url(redis_url, ttl_s=1)
    try:
        rec = await store.create(ALICE, "omni", "en")
        sid = rec.session_id
        await store.acquire(sid, "llm", "r1")
        await store.acquire(sid, "audio", "a1")
        await store.append_replay(sid, ReplayEntry("system", 3, b"p"))
        present = [k for k in store.keys(sid) if await store.client.exists(k)]
        assert len(present) == 4
        ttls = [await store.client.pttl(k) for k in present]
        assert all(0 < t <= 1000 for t in ttls)
        assert await store.touch(sid)
        assert (await store.get(sid)).updated_at >= rec.updated_at

        async def all_gone() -> bool:
            return not await store.client.exists(*store.keys(sid))

        await wait_until(all_gone, timeout_s=10)
        assert not await store.touch(sid)
        assert await store.missing([sid]) == {sid}
        with pytest.raises(SessionNotFound):
            await store.acquire(sid, "llm", "r1")
        with pytest.raises(SessionNotFound):
            await store.append_replay(sid, ReplayEntry("unit", 1, b""))
        # nothing was recreated by the refused calls
        assert not await store.client.exists(*store.keys(sid))
    finally:
        await store.aclose()


async def test_lease_acquire_renew_steal_and_fencing(store):
    sid = (await store.create(ALICE, "omni", "en")).session_id
    a1 = await store.acquire(sid, "llm", "replica-A")
    assert (a1.epoch, a1.took_over) == (1, True)
    renew = await store.acquire(sid, "llm", "replica-A")
    assert (renew.epoch, renew.took_over) == (1, False)
    assert await store.check(a1)
    await store.append_replay(sid, ReplayEntry("system", 10, b"sys"), fence=a1)

    b = await store.acquire(sid, "llm", "replica-B")  # the router moved the session: B takes over
    assert (b.epoch, b.took_over) == (2, True)
    assert not await store.check(a1) and await store.check(b)
    with pytest.raises(LeaseLost):
        await store.require(a1)
    with pytest.raises(LeaseLost, match="refused"):
        await store.append_replay(sid, ReplayEntry("unit", 5, b"stale"), fence=a1)
    assert not await store.release(a1)  # a stale owner cannot release the new owner's lease
    await store.append_replay(sid, ReplayEntry("unit", 5, b"fresh"), fence=b)
    assert [e.payload for e in await store.replay(sid)] == [b"sys", b"fresh"]

    # A comes back (e.g. the router sent the session back): new epoch, so A knows its own state is stale
    a3 = await store.acquire(sid, "llm", "replica-A")
    assert (a3.epoch, a3.took_over) == (3, True)
    assert await store.lease(sid, "llm") == Fence(sid, "llm", "replica-A", 3)

    # release keeps the epoch counter: the next owner never reuses an old epoch
    assert await store.release(a3)
    assert await store.lease(sid, "llm") is None
    assert (await store.acquire(sid, "llm", "replica-A")).epoch == 4
    # roles are independent
    assert (await store.acquire(sid, "audio", "audio-1")).epoch == 1
    with pytest.raises(SessionInputError):
        await store.acquire(sid, "tts", "x")


async def test_concurrent_takeover_has_one_winner_per_epoch(store):
    sid = (await store.create(ALICE, "omni", "en")).session_id
    fences = await asyncio.gather(*(store.acquire(sid, "llm", f"r{i}") for i in range(8)))
    assert sorted(f.epoch for f in fences) == list(range(1, 9))
    valid = [f for f in fences if await store.check(f)]
    assert len(valid) == 1 and valid[0].epoch == 8


async def test_replay_log_round_trip_and_bounds(store):
    sid = (await store.create(ALICE, "omni", "en")).session_id
    entries = [
        ReplayEntry("system", 40, b"\x00\x01binary", {"prompt": "sys"}),
        ReplayEntry("unit", 30, b"u" * 100, {"seq": 0}),
    ]
    rec = await store.append_replay(sid, entries)
    assert (rec.tokens, rec.replay_entries) == (70, 2)
    assert rec.replay_bytes == sum(len(e.to_bytes()) for e in entries)
    assert await store.replay(sid) == entries

    with pytest.raises(SessionLimitExceeded, match="tokens limit \\(70 used of 100\\)"):
        await store.append_replay(sid, [ReplayEntry("unit", 20, b""), ReplayEntry("unit", 11, b"")])
    assert (await store.get(sid)).tokens == 70 and len(await store.replay(sid)) == 2  # all-or-nothing

    with pytest.raises(SessionLimitExceeded, match="bytes"):
        await store.append_replay(sid, ReplayEntry("image", 1, b"x" * 10_000))
    await store.append_replay(sid, [ReplayEntry("t", 1, b""), ReplayEntry("t", 1, b""), ReplayEntry("t", 1, b"")])
    with pytest.raises(SessionLimitExceeded, match="entries"):
        await store.append_replay(sid, ReplayEntry("t", 1, b""))
    with pytest.raises(SessionInputError):
        await store.append_replay(sid, [])
    with pytest.raises(SessionNotFound):
        await store.replay("unknown")


async def test_turn_transitions(store):
    sid = (await store.create(ALICE, "omni", "en")).session_id
    assert await store.set_turn(sid, "user_turn") == "idle"
    assert await store.set_turn(sid, "user_turn") == "user_turn"
    assert await store.set_turn(sid, "answering") == "user_turn"
    with pytest.raises(InvalidTurn, match="answering"):
        await store.set_turn(sid, "user_turn")
    assert await store.set_turn(sid, "interrupted") == "answering"
    assert await store.set_turn(sid, "user_turn") == "interrupted"
    assert (await store.get(sid)).turn == "user_turn"
    with pytest.raises(SessionInputError):
        await store.set_turn(sid, "sleeping")
    with pytest.raises(SessionNotFound):
        await store.set_turn("gone", "user_turn")


async def test_delete_removes_every_key(store):
    sid = (await store.create(ALICE, "omni", "en")).session_id
    await store.acquire(sid, "llm", "r")
    await store.acquire(sid, "audio", "a")
    await store.append_replay(sid, ReplayEntry("system", 3, b"s"))
    other = (await store.create(BOB, "chat", "en")).session_id
    assert await store.delete(sid)
    remaining = {k.decode() for k in await store.client.keys("*")}
    assert remaining == {store.keys(other)[0]}
    assert not await store.delete(sid)
    assert await store.missing([sid, other]) == {sid}


async def test_concurrent_sessions_are_isolated(store):
    async def drive(i: int) -> tuple[str, list[bytes]]:
        sid = (await store.create(key_hash(f"k{i}"), "omni", "en")).session_id
        fence = await store.acquire(sid, "llm", f"replica-{i % 3}")
        for j in range(4):
            await store.append_replay(sid, ReplayEntry("unit", 1, f"{i}:{j}".encode()), fence=fence)
        await store.set_turn(sid, "user_turn")
        return sid, [f"{i}:{j}".encode() for j in range(4)]

    results = await asyncio.gather(*(drive(i) for i in range(12)))
    for i, (sid, expected) in enumerate(results):
        rec = await store.get(sid)
        assert rec.owner == key_hash(f"k{i}") and rec.tokens == 4 and rec.turn == "user_turn"
        assert [e.payload for e in await store.replay(sid)] == expected
        assert (await store.lease(sid, "llm")).replica_id == f"replica-{i % 3}"


async def test_redis_loss_is_a_retryable_error_not_a_hang():
    server = RedisServer.start()
    store = SessionStore.from_url(server.url, socket_timeout_s=2.0)
    try:
        sid = (await store.create(ALICE, "omni", "en")).session_id
        fence = await store.acquire(sid, "llm", "r")
        server.stop()
        started = time.monotonic()
        for call in (
            store.get(sid),
            store.acquire(sid, "llm", "r"),
            store.append_replay(sid, ReplayEntry("unit", 1, b""), fence=fence),
            store.replay(sid),
            store.missing([sid]),
        ):
            with pytest.raises(StoreUnavailable, match="unreachable"):
                await call
        assert time.monotonic() - started < 30
    finally:
        await store.aclose()
        server.stop()
