"""The session-stage protocol (`services.runtime.session_stage`) against a real redis-server, over a stage whose
state is simply the payloads it applied: one Redis round trip per logged request while a replica holds the
session, a session taken over elsewhere taken back and rebuilt, and, with the write and the apply overlapped,
no local state ever left ahead of the log after a refusal, a failure or a cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from protos.minicpmo.v1 import llm_pb2, replay_pb2
from services.gateway.auth import key_hash
from services.gateway.sessions import SessionRecords
from services.runtime.ownership import OwnershipStore, SessionLimitExceeded
from services.runtime.session_stage import SessionStage
from tests.servers import redis_server, redis_url  # noqa: F401  (real redis-server fixtures)

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
def anyio_backend():
    return "asyncio"


class PayloadStage(SessionStage):
    """Per session, the payloads applied so far (what the log holds, if the protocol is right)."""

    role = "llm"

    def __init__(self, store: OwnershipStore, replica_id: str):
        super().__init__(store, replica_id)
        self.state: dict[str, list[bytes]] = {}
        self.rebuilds = 0

    def has_state(self, session_id: str) -> bool:
        return session_id in self.state

    def drop_state(self, session_id: str) -> None:
        self.state.pop(session_id, None)

    async def rebuild(self, session_id: str, entries: Sequence[replay_pb2.ReplayEntry]) -> dict[str, int]:
        self.rebuilds += 1
        self.state[session_id] = [e.prefill.embeddings.data for e in entries]
        return {e.request_id: i + 1 for i, e in enumerate(entries)}

    async def push(self, sid: str, rid: str, payload: bytes, overlap: bool, before_apply=None) -> int:
        async def apply(_fence) -> int:
            if before_apply is not None:
                await before_apply()
            self.state[sid].append(payload)
            return len(self.state[sid])

        entry = replay_pb2.ReplayEntry(request_id=rid, llm_tokens=1)
        entry.prefill.embeddings.data = payload
        return await self.log_then_apply(sid, rid, lambda: entry, apply, overlap=overlap)


class CountingStore(OwnershipStore):
    """The real store, counting the lease round trips the protocol makes."""

    acquires = 0

    async def acquire(self, *args, **kwargs):
        self.acquires += 1
        return await super().acquire(*args, **kwargs)


@pytest.fixture
async def store(redis_url):  # noqa: F811
    s = CountingStore.from_url(redis_url, ttl_s=30, max_tokens=6)
    yield s
    await s.aclose()


@pytest.fixture
async def sid(redis_url):  # noqa: F811
    records = SessionRecords.from_url(redis_url, ttl_s=30)
    yield (await records.create(key_hash("alice"), "omni", "en")).session_id
    await records.aclose()


async def logged(store: OwnershipStore, sid: str) -> list[bytes]:
    return [e.prefill.embeddings.data for e in await store.log(sid, "llm")]


@pytest.mark.parametrize("overlap", [False, True])
async def test_a_held_session_logs_each_request_in_one_round_trip(store, sid, overlap):
    stage = PayloadStage(store, "replica-A")
    assert await stage.push(sid, "r1", b"a", overlap) == 1  # first request: acquire, (empty) rebuild, log, apply
    assert store.acquires == 1
    for i, payload in enumerate([b"b", b"c", b"d"], start=2):
        assert await stage.push(sid, f"r{i}", payload, overlap) == i
    assert store.acquires == 1, "a replica holding the session fences with its write alone"
    assert stage.state[sid] == await logged(store, sid) == [b"a", b"b", b"c", b"d"]
    assert await stage.push(sid, "r3", b"c", overlap) == 3  # a retry is answered from the record, not reapplied
    assert await logged(store, sid) == [b"a", b"b", b"c", b"d"]


@pytest.mark.parametrize("overlap", [False, True])
async def test_a_session_taken_over_elsewhere_is_taken_back_and_rebuilt(store, sid, overlap):
    a, b = PayloadStage(store, "replica-A"), PayloadStage(store, "replica-B")
    await a.push(sid, "r1", b"a1", overlap)
    await a.push(sid, "r2", b"a2", overlap)
    await b.push(sid, "r3", b"b1", overlap)  # the router moved the session: B takes it over from the log
    assert b.state[sid] == [b"a1", b"a2", b"b1"]

    # A still holds its (now stale) state; its held fence is refused by the write, and it takes the session back
    assert await a.push(sid, "r4", b"a3", overlap) == 4
    assert a.rebuilds == 2
    assert a.state[sid] == await logged(store, sid) == [b"a1", b"a2", b"b1", b"a3"]
    assert (await store.lease(sid, "llm")).replica_id == "replica-A"


async def test_the_sweep_forgets_sessions_that_moved_or_ended_and_keeps_the_rest(store, redis_url, sid):  # noqa: F811
    """A scale-up moves a session to a new replica: the replica it left drops its state at the next sweep (its
    memory, and LLMCore's promise of KV room, are not held until the session expires); a session it still holds is
    kept, one whose lock a request holds waits for the next sweep, and a closed session is dropped."""
    records = SessionRecords.from_url(redis_url, ttl_s=30)
    kept, closed = [(await records.create(key_hash("alice"), "omni", "en")).session_id for _ in range(2)]
    a, b = PayloadStage(store, "replica-A"), PayloadStage(store, "replica-B")
    for s in (sid, kept, closed):
        await a.push(s, f"{s}-r1", b"a1", overlap=False)
    await b.push(sid, "r2", b"b1", overlap=False)  # moved: B took the lease over
    await records.delete(closed, key_hash("alice"))
    await records.aclose()

    async with a._locks[sid]:  # a request of the moved session is running on A: not now
        assert await a.sweep_once() == [closed]
    assert await a.sweep_once() == [sid]
    assert set(a.state) == {kept} and set(a.epochs) == {kept}
    assert await b.sweep_once() == []
    assert await a.push(sid, "r3", b"a2", overlap=False) == 3  # moved back: rebuilt from the log, nothing lost
    assert a.state[sid] == await logged(store, sid) == [b"a1", b"b1", b"a2"]


async def test_an_overlapped_apply_refused_by_the_log_is_forgotten(store, sid):
    stage = PayloadStage(store, "replica-A")
    for i in range(6):  # the store allows 6 tokens: one each
        await stage.push(sid, f"r{i}", b"%d" % i, overlap=True)
    with pytest.raises(SessionLimitExceeded):
        await stage.push(sid, "r6", b"6", overlap=True)  # applied while the log refused it
    assert not stage.has_state(sid), "state ahead of the log must not survive the request"
    async with stage.owned(sid):
        assert stage.state[sid] == await logged(store, sid) == [b"%d" % i for i in range(6)]


async def test_a_refusal_without_overlap_keeps_the_state(store, sid):
    stage = PayloadStage(store, "replica-A")
    for i in range(6):
        await stage.push(sid, f"r{i}", b"%d" % i, overlap=False)
    with pytest.raises(SessionLimitExceeded):
        await stage.push(sid, "r6", b"6", overlap=False)  # refused before it was applied: nothing to undo
    assert stage.state[sid] == await logged(store, sid) and stage.rebuilds == 1


async def test_a_failed_overlapped_apply_is_rebuilt_and_its_retry_not_applied_twice(store, sid):
    stage = PayloadStage(store, "replica-A")
    await stage.push(sid, "r1", b"a", overlap=True)

    async def fail():
        raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError, match="forward failed"):
        await stage.push(sid, "r2", b"b", overlap=True, before_apply=fail)
    assert not stage.has_state(sid)
    assert await logged(store, sid) == [b"a", b"b"]  # the write had landed
    assert await stage.push(sid, "r2", b"b", overlap=True) == 2  # the retry: rebuilt from the log, answered
    assert stage.state[sid] == await logged(store, sid) == [b"a", b"b"]


async def test_a_cancelled_overlapped_request_leaves_state_and_log_in_agreement(store, sid):
    stage = PayloadStage(store, "replica-A")
    await stage.push(sid, "r1", b"a", overlap=True)
    entered = asyncio.Event()

    async def hang():
        entered.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(stage.push(sid, "r2", b"b", overlap=True, before_apply=hang))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not stage.has_state(sid)
    await stage.push(sid, "r3", b"c", overlap=True)  # rebuilt from whatever the log holds, then extended
    assert stage.state[sid] == await logged(store, sid)
    assert (await logged(store, sid))[-1] == b"c"


class GatedStore(CountingStore):
    """The real store whose log writes wait for `gate` (to cancel a request while its write is in flight)."""

    gate: asyncio.Event | None = None

    async def append(self, *args, **kwargs):
        if self.gate is not None:
            await self.gate.wait()
        return await super().append(*args, **kwargs)


async def test_cancelled_again_while_its_write_settles_still_forgets_the_state(redis_url, sid):  # noqa: F811
    store = GatedStore.from_url(redis_url, ttl_s=30, max_tokens=6)
    stage = PayloadStage(store, "replica-A")
    await stage.push(sid, "r1", b"a", overlap=True)
    store.gate, entered = asyncio.Event(), asyncio.Event()

    async def hang():
        entered.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(stage.push(sid, "r2", b"b", overlap=True, before_apply=hang))
    await entered.wait()
    task.cancel()  # the apply stops; the request now waits for its (gated) write to settle
    await asyncio.sleep(0)
    task.cancel()  # and is cancelled again while it waits
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not stage.has_state(sid)
    store.gate.set()
    await stage.push(sid, "r3", b"c", overlap=True)
    assert stage.state[sid] == await logged(store, sid) == [b"a", b"c"]
    await store.aclose()


async def test_an_llm_session_evicted_by_the_engine_is_rebuilt_not_started_over(redis_url, sid, tiny_checkpoint):  # noqa: F811
    from services.llm_core.deployment import LLMCore

    llm = LLMCore.func_or_class(str(tiny_checkpoint), "cpu", redis_url)

    async def prefill(rid: str, n: int) -> int:
        request = llm_pb2.PrefillRequest(session_id=sid, request_id=rid, kind=llm_pb2.PREFILL_KIND_TEXT,
                                         input=llm_pb2.PrefillInput(input_ids=list(range(10, 10 + n))))  # fmt: skip
        return (await llm.Prefill(request)).kv_len

    try:
        assert await prefill("r1", 10) == 10
        assert await prefill("r2", 5) == 15
        llm.engine.drop(sid)  # the engine frees the session's KV behind the stage's back, as an eviction does
        assert await prefill("r3", 4) == 19, "found before the request: rebuilt from the log"

        queue = llm.engine.prefill

        async def evicted_first(session_id, embeds, **kwargs):  # the eviction lands after the stage's check
            llm.engine.prefill = queue
            llm.engine.drop(session_id)
            return await queue(session_id, embeds, **kwargs)

        llm.engine.prefill = evicted_first
        assert await prefill("r4", 3) == 22, "evicted after the check: rebuilt from the log, not started over"
        assert len(await llm.store.log(sid, "llm")) == 4
    finally:
        llm.engine.stop()
        await llm.store.aclose()


async def test_an_answer_whose_session_the_engine_evicts_after_the_check_is_answered_from_the_rebuilt_kv(
    redis_url, sid, tiny_checkpoint  # noqa: F811
):
    from services.common.generation import GREEDY
    from services.gateway.context import sampling_msg
    from services.llm_core.deployment import LLMCore

    llm = LLMCore.func_or_class(str(tiny_checkpoint), "cpu", redis_url)

    async def answer(session_id: str, rid: str) -> list[int]:
        await llm.Prefill(llm_pb2.PrefillRequest(session_id=session_id, request_id=f"p-{rid}", kind=llm_pb2.PREFILL_KIND_TEXT,
                                                 input=llm_pb2.PrefillInput(input_ids=list(range(10, 22)))))  # fmt: skip
        request = llm_pb2.GenerateRequest(
            session_id=session_id, request_id=rid, input=llm_pb2.PrefillInput(input_ids=[7, 8]),
            sampling=sampling_msg(GREEDY.with_(max_new_tokens=6)), spk_position=-1,
        )  # fmt: skip
        return [t for msg in [m async for m in llm.Generate(request)] for t in msg.token_ids]

    records = SessionRecords.from_url(redis_url, ttl_s=30)
    try:
        reference = await answer((await records.create(key_hash("alice"), "omni", "en")).session_id, "a0")
        generate = llm.engine.generate

        def evicted_first(session_id, *args, **kwargs):  # the eviction lands after the stage's check
            llm.engine.generate = generate
            llm.engine.drop(session_id)
            return generate(session_id, *args, **kwargs)

        llm.engine.generate = evicted_first
        assert await answer(sid, "a1") == reference, "evicted after the check: rebuilt from the log, answered once"
        assert llm.engine.generate is generate  # the eviction did happen
        log = await llm.store.log(sid, "llm")
        assert [e.WhichOneof("content") for e in log] == ["prefill", "answer"]
        assert list(log[1].answer.streamed_ids) == reference
    finally:
        llm.engine.stop()
        await llm.store.aclose()
        await records.aclose()


async def test_a_unit_over_the_hard_limit_while_the_context_rolls_waits_for_the_roll(redis_url, sid, tiny_checkpoint):  # noqa: F811
    """Units sent faster than the roll is built (a recording fed faster than real time) reach the hard limit before
    the trimmed KV is ready: the unit that would pass it waits for the roll and goes into the trimmed KV, instead of
    failing RESOURCE_EXHAUSTED (which it did before)."""
    from services.llm_core.deployment import LLMCore

    llm = LLMCore.func_or_class(str(tiny_checkpoint), "cpu", redis_url, max_session_tokens=64,
                                context_window_tokens=40, context_keep_tokens=20)  # fmt: skip
    gate = asyncio.Event()
    roll = llm._roll

    async def held_roll(session_id: str) -> None:  # the roll is slower than the units, as a big one is
        await gate.wait()
        await roll(session_id)

    llm._roll = held_roll

    async def prefill(rid: str, kind: int) -> int:
        request = llm_pb2.PrefillRequest(session_id=sid, request_id=rid, kind=kind,
                                         input=llm_pb2.PrefillInput(input_ids=list(range(10, 18))))  # fmt: skip
        return (await llm.Prefill(request)).kv_len

    try:
        assert await prefill("system", llm_pb2.PREFILL_KIND_SYSTEM) == 8
        kv = [await prefill(f"u{i}", llm_pb2.PREFILL_KIND_UNIT) for i in range(7)]
        assert kv == [16, 24, 32, 40, 48, 56, 64] and sid in llm._rolling, "the roll started at 40 and is held"
        over = asyncio.create_task(prefill("u7", llm_pb2.PREFILL_KIND_UNIT))  # 72 > 64 in the full KV
        done, _ = await asyncio.wait({over}, timeout=1.0)  # before the fix it failed here at once
        assert not done, f"the unit over the limit did not wait for the roll: {over.result()}"
        gate.set()
        # the roll (its log read once released) kept the system prompt and the latest unit, then u7 went in
        assert await over == 8 + 8 + 8
        assert [e.request_id for e in await llm.store.log(sid, "llm")] == ["system", "u6", "u7"]
    finally:
        gate.set()
        llm.engine.stop()
        await llm.store.aclose()


async def test_a_roll_due_while_an_answer_streams_switches_once_the_answer_is_logged(redis_url, sid, tiny_checkpoint):  # noqa: F811
    """An answer streams outside the session's lock. A roll that reaches its switch meanwhile waits until the answer
    is logged, then switches with the answer in the trimmed KV. Before, it switched at once when the engine had
    finished the answer's tokens (its KV then lacked an answer the log got after), or failed on the busy session
    and threw its work away."""
    from services.common.generation import GREEDY
    from services.gateway.context import sampling_msg
    from services.llm_core.deployment import LLMCore

    llm = LLMCore.func_or_class(str(tiny_checkpoint), "cpu", redis_url, max_session_tokens=64,
                                context_window_tokens=40, context_keep_tokens=20)  # fmt: skip
    roll_gate, answer_gate, streaming = asyncio.Event(), asyncio.Event(), asyncio.Event()
    roll, stream = llm._roll, llm._stream

    async def held_roll(session_id: str) -> None:
        await roll_gate.wait()
        await roll(session_id)

    async def held_stream(*args, **kwargs):  # the client reads the answer slowly: it is still streaming
        async for msg in stream(*args, **kwargs):
            yield msg
            streaming.set()
            await answer_gate.wait()

    llm._roll, llm._stream = held_roll, held_stream

    async def prefill(rid: str, kind: int = llm_pb2.PREFILL_KIND_UNIT) -> int:
        request = llm_pb2.PrefillRequest(session_id=sid, request_id=rid, kind=kind,
                                         input=llm_pb2.PrefillInput(input_ids=list(range(10, 18))))  # fmt: skip
        return (await llm.Prefill(request)).kv_len

    async def answer() -> list[int]:
        request = llm_pb2.GenerateRequest(session_id=sid, request_id="a0", input=llm_pb2.PrefillInput(input_ids=[7, 8]),
                                          sampling=sampling_msg(GREEDY.with_(max_new_tokens=3)), spk_position=-1)  # fmt: skip
        return [t for msg in [m async for m in llm.Generate(request)] for t in msg.token_ids]

    try:
        assert await prefill("system", llm_pb2.PREFILL_KIND_SYSTEM) == 8
        assert [await prefill(f"u{i}") for i in range(4)] == [16, 24, 32, 40]
        rolling = llm._rolling[sid]  # due at 40, held
        answering = asyncio.create_task(answer())
        await streaming.wait()
        roll_gate.set()
        done, _ = await asyncio.wait({rolling}, timeout=1.0)
        assert not done, "the roll switched (or gave up) while the answer was streaming"
        answer_gate.set()
        assert len(await answering) == 3
        await rolling
        log = await llm.store.log(sid, "llm")
        assert [e.request_id for e in log] == ["system", "u3", "a0"], "trimmed, with the answer caught up"
        assert llm.engine.kv_len(sid) == sum(e.llm_tokens for e in log) == 16 + log[-1].llm_tokens
    finally:
        roll_gate.set()
        answer_gate.set()
        llm.engine.stop()
        await llm.store.aclose()


async def test_sessions_are_admitted_with_room_to_roll_and_concurrent_rolls_take_turns(redis_url, tiny_checkpoint):  # noqa: F811
    """An arena of 3 blocks (128 tokens each) holds 2 live sessions of at most 64 tokens and the room of one roll.
    A third session is refused at once; the two sessions' rolls, due at the same time, take turns in the one roll's
    room, and both sessions go on without an error (before admission, the second roll found the arena full and
    failed, and the session's units then hit the hard limit)."""
    from services.gateway.servicer import status_for
    from services.llm_core.deployment import LLMCore

    llm = LLMCore.func_or_class(str(tiny_checkpoint), "cpu", redis_url, kv_budget_tokens=3 * 128,
                                max_session_tokens=64, context_window_tokens=40, context_keep_tokens=20)  # fmt: skip
    records = SessionRecords.from_url(redis_url, ttl_s=30)
    a, b, c = [(await records.create(key_hash("alice"), "omni", "en")).session_id for _ in range(3)]
    gate = asyncio.Event()
    roll = llm._roll

    async def held_roll(session_id: str) -> None:  # both rolls start before either has built anything
        await gate.wait()
        await roll(session_id)

    llm._roll = held_roll

    async def prefill(sid: str, rid: str, kind: int = llm_pb2.PREFILL_KIND_UNIT) -> int:
        request = llm_pb2.PrefillRequest(session_id=sid, request_id=rid, kind=kind,
                                         input=llm_pb2.PrefillInput(input_ids=list(range(10, 18))))  # fmt: skip
        return (await llm.Prefill(request)).kv_len

    try:
        assert llm.admission.live_sessions == 2
        for sid in (a, b):
            assert await prefill(sid, "system", llm_pb2.PREFILL_KIND_SYSTEM) == 8
        with pytest.raises(Exception, match="KV arena full") as refused:
            await prefill(c, "system", llm_pb2.PREFILL_KIND_SYSTEM)
        assert status_for(refused.value)[0].name == "RESOURCE_EXHAUSTED"
        for i in range(4):
            assert [await prefill(sid, f"u{i}") for sid in (a, b)] == [16 + 8 * i] * 2
        rolls = [llm._rolling[a], llm._rolling[b]]
        gate.set()
        await asyncio.gather(*rolls)
        for sid in (a, b):  # each rolled: the system prompt and the latest unit
            assert llm.engine.kv_len(sid) == 16, sid
            assert [e.request_id for e in await llm.store.log(sid, "llm")] == ["system", "u3"]
        for i in range(4, 12):  # and both roll again, as often as their units need, without an error
            assert all(16 < kv <= 64 for kv in [await prefill(sid, f"u{i}") for sid in (a, b)])
        await asyncio.gather(*llm._rolling.values())
        await llm.Drop(llm_pb2.SessionRef(session_id=a))
        assert await prefill(c, "system", llm_pb2.PREFILL_KIND_SYSTEM) == 8, "a closed session's room is free again"
    finally:
        gate.set()
        llm.engine.stop()
        await llm.store.aclose()
        await records.aclose()
