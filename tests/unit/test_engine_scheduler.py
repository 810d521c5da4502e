"""Continuous-batching decisions (pure logic): budgets, order, chunking, session checks, eviction."""

from __future__ import annotations

from services.llm_core.engine.kv_cache import EngineFullError, KVAllocator, Reservation
from services.llm_core.engine.scheduler import (
    EXISTING,
    ContextLengthError,
    Scheduler,
    SessionStateError,
)


def make(num_blocks=64, block_size=4, max_batch_tokens=16, max_session_tokens=1000, evict_idle=True):
    return Scheduler(KVAllocator(num_blocks, block_size), max_batch_tokens, max_session_tokens, evict_idle)


def run_step(s: Scheduler):
    """Schedule and commit a step as the engine would after a successful forward."""
    batch = s.schedule()
    for r in batch.decodes:
        s.commit_decode(r)
    for c in batch.prefills:
        s.commit_prefill(c)
    return batch


def test_decodes_first_then_prefills_fill_the_token_budget_in_arrival_order():
    s = make(max_batch_tokens=16)
    g = s.add("a", 3, decode=True)
    run_step(s)  # a's prefix is in; a now decodes
    p1 = s.add("b", 10, decode=False)
    p2 = s.add("c", 10, decode=False)
    batch = s.schedule()
    assert batch.decodes == [g]
    assert [(c.request, c.start, c.n) for c in batch.prefills] == [(p1, 0, 10), (p2, 0, 5)]
    assert batch.num_tokens == 16


def test_long_prefill_is_chunked_across_steps_with_kv_offsets():
    s = make(max_batch_tokens=8)
    r = s.add("a", 20, decode=False)
    chunks = []
    while r.prefilling:
        (c,) = run_step(s).prefills
        chunks.append((c.start, c.n, c.kv_start, c.last))
    assert chunks == [(0, 8, 0, False), (8, 8, 8, False), (16, 4, 16, True)]
    s.finish(r)
    assert s.kv.num_tokens("a") == 20 and not s.has_work() and s.is_idle("a")


def test_requests_of_one_session_run_in_order():
    s = make(max_batch_tokens=64)
    first = s.add("a", 4, decode=False)
    second = s.add("a", 4, decode=False)
    batch = run_step(s)
    assert [c.request for c in batch.prefills] == [first]
    s.finish(first)
    assert [(c.request, c.kv_start) for c in run_step(s).prefills] == [(second, 4)]
    assert s.kv.num_tokens("a") == 8


def test_expected_kv_len_mismatch_fails_the_request_with_a_rebuild_hint():
    s = make()
    r = s.add("ghost", 4, decode=False, expected_kv_len=10)
    batch = s.schedule()
    ((failed, err),) = batch.failed
    assert failed is r and isinstance(err, SessionStateError) and "rebuild" in str(err)
    assert not s.kv.has("ghost") and not s.has_work()

    s.add("a", 4, decode=False)
    run_step(s)
    s.finish(s.head("a"))
    r = s.add("a", 4, decode=False, expected_kv_len=0)  # "new session" but it exists
    ((failed, err),) = s.schedule().failed
    assert "holds 4 KV tokens, caller expected 0" in str(err)
    ok = s.add("a", 4, decode=False, expected_kv_len=4)
    assert [c.request for c in s.schedule().prefills] == [ok]


def test_a_request_that_needs_existing_kv_fails_once_it_was_evicted_instead_of_starting_over():
    s = make()
    s.add("a", 4, decode=False)
    run_step(s)
    s.finish(s.head("a"))
    ok = s.add("a", 4, decode=True, expected_kv_len=EXISTING)  # any length: the caller's answers may grow it
    assert [c.request for c in run_step(s).prefills] == [ok]
    s.finish(ok)
    s.kv.free("a")  # what an eviction does
    r = s.add("a", 4, decode=False, expected_kv_len=EXISTING)
    ((failed, err),) = s.schedule().failed
    assert failed is r and isinstance(err, SessionStateError) and "rebuild" in str(err)
    assert not s.kv.has("a"), "the session was not started over without its context"


def test_session_token_limit():
    s = make(max_session_tokens=10)
    s.add("a", 11, decode=False)
    ((_, err),) = s.schedule().failed
    assert isinstance(err, ContextLengthError) and isinstance(err, ValueError)


def test_full_pool_evicts_idle_sessions_least_recently_used_first():
    s = make(num_blocks=4, block_size=4, max_batch_tokens=64)
    for sid in ("old", "newer"):
        r = s.add(sid, 8, decode=False)
        run_step(s)
        s.finish(r)
    s.kv.touch("newer")
    s.add("c", 8, decode=False)
    batch = run_step(s)
    assert batch.evicted == ["old"] and s.evictions == 1
    assert not s.kv.has("old") and s.kv.has("newer") and s.kv.num_tokens("c") == 8


def test_busy_sessions_are_never_evicted_and_the_newcomer_fails_clearly():
    s = make(num_blocks=4, block_size=4, max_batch_tokens=64)
    s.add("busy", 16, decode=True)  # still has work: not evictable
    run_step(s)
    s.add("new", 4, decode=False)
    batch = s.schedule()
    # the pool is exactly full: busy's next decode row and the newcomer both fail, busy keeps its KV
    assert [(r.session_id, type(e)) for r, e in batch.failed] == [("busy", EngineFullError), ("new", EngineFullError)]
    assert s.kv.num_tokens("busy") == 16
    assert not s.kv.has("new")  # a new session that never got KV leaves nothing behind


def test_without_eviction_a_full_pool_refuses_new_work():
    s = make(num_blocks=2, block_size=4, max_batch_tokens=64, evict_idle=False)
    r = s.add("a", 8, decode=False)
    run_step(s)
    s.finish(r)
    s.add("b", 1, decode=False)
    ((_, err),) = s.schedule().failed
    assert isinstance(err, EngineFullError)
    assert s.kv.num_tokens("a") == 8 and s.evictions == 0


def test_a_new_session_is_admitted_only_with_its_reservation_and_evicts_only_long_idle_sessions():
    now = [0.0]
    s = Scheduler(KVAllocator(8, 4, seconds=lambda: now[0]), 64, 1000, evict_idle=True, evict_after_s=10.0)
    live = Reservation(12, headroom=8)
    for sid in ("a", "b"):
        r = s.add(sid, 4, decode=False, reservation=live)
        run_step(s)
        s.finish(r)
    assert s.kv.run("a") == (0, 3) and s.kv.run("b") == (3, 3)
    now[0] = 5.0
    s.add("c", 4, decode=False, reservation=live)
    ((_, err),) = s.schedule().failed
    assert isinstance(err, EngineFullError) and not s.kv.has("c")
    assert s.evictions == 0, "sessions idle for less than evict_after_s are likely live: the newcomer waits"
    now[0] = 11.0
    s.add("c", 4, decode=False, reservation=live)
    batch = run_step(s)
    assert batch.evicted == ["a"] and s.kv.has("b") and s.kv.num_tokens("c") == 4


def test_drop_returns_pending_requests_and_frees_kv():
    s = make()
    r1 = s.add("a", 4, decode=False)
    run_step(s)
    r2 = s.add("a", 4, decode=True)
    assert s.drop("a") == [r1, r2] and r1.finished and r2.finished
    assert not s.kv.has("a") and s.kv.free_blocks == 64 and not s.has_work()


def test_stats_count_decoding_prefilling_and_waiting():
    s = make(max_batch_tokens=4)
    s.add("a", 2, decode=True)
    run_step(s)
    s.add("b", 10, decode=False)
    s.add("b", 3, decode=False)
    s.add("c", 3, decode=False)
    run_step(s)
    assert s.stats() == {"decoding": 1, "prefilling": 1, "waiting": 2}


def test_abort_all_retires_every_request_and_keeps_committed_kv():
    s = make(max_batch_tokens=4)
    s.finish(run_step_request(s, "a", 4))
    r1 = s.add("a", 2, decode=True)
    r2 = s.add("b", 8, decode=False)
    s.add("c", 8, decode=False)  # never started: its session never existed
    run_step(s)  # a's prefix (2 rows) and the first 2 rows of b
    pending = s.abort_all()
    assert pending[:2] == [r1, r2] and all(r.finished for r in pending) and not s.has_work()
    assert (s.kv.num_tokens("a"), s.kv.num_tokens("b"), s.kv.has("c")) == (6, 2, False)


def run_step_request(s: Scheduler, sid: str, n: int):
    r = s.add(sid, n, decode=False)
    run_step(s)
    return r
