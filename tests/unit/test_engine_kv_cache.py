"""The KV arena's bookkeeping (KVAllocator: runs, growth, moves, compaction) and storage (KVArena), no model."""

from __future__ import annotations

import random

import pytest
import torch

from services.llm_core.engine.kv_cache import (
    EngineFullError,
    KVAllocator,
    KVArena,
    Move,
    Reservation,
    SessionRefused,
    Zero,
)
from services.runtime.errors import ReplicaFull


def arena_for(kv: KVAllocator, layers: int = 2) -> KVArena:
    return KVArena(layers, kv.num_blocks, kv.block_size, num_kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")


def grow(kv: KVAllocator, arena: KVArena, sid: str, n: int, value: float) -> None:
    """What the engine does for n new rows: reserve, apply the decided ops, write the rows, commit."""
    kv.reserve(sid, n)
    arena.apply(kv.pop_ops())
    start = kv.offset(sid) + kv.num_tokens(sid)
    rows = torch.arange(start, start + n)
    for layer in range(arena.k.shape[0]):
        arena.write(layer, rows, torch.full((n, 1, 2), value), torch.full((n, 1, 2), -value))
    kv.commit(sid, n)


def check_arena(kv: KVAllocator, arena: KVArena, values: dict[str, float]) -> None:
    """Each session's committed rows hold its value; every other row (free, or past a run's committed rows) is 0."""
    written = torch.zeros(arena.k.shape[2], dtype=torch.bool)
    for sid, value in values.items():
        written[kv.offset(sid) : kv.offset(sid) + kv.num_tokens(sid)] = True
        k, v = arena.keys(1, kv.offset(sid), kv.num_tokens(sid))
        assert (k == value).all() and (v == -value).all(), sid
    assert (arena.k[:, :, ~written] == 0).all() and (arena.v[:, :, ~written] == 0).all()


def test_sessions_get_disjoint_contiguous_runs():
    kv = KVAllocator(num_blocks=8, block_size=4)
    kv.create("a")
    kv.create("b")
    kv.reserve("a", 6)  # 2 blocks
    kv.reserve("b", 1)  # 1 block
    kv.commit("a", 6)
    kv.commit("b", 1)
    assert kv.run("a") == (0, 2) and kv.run("b") == (2, 1)
    assert kv.offset("b") == 8 and kv.num_tokens("a") == 6
    # growing within the reserved blocks needs nothing; crossing the boundary needs one more
    assert kv.blocks_needed("a", 2) == 0 and kv.blocks_needed("a", 3) == 1
    assert kv.free_blocks == 5 and kv.used_tokens == 7 and kv.capacity_tokens == 32
    assert kv.pop_ops() == []


def test_growth_extends_in_place_when_the_next_blocks_are_free():
    kv = KVAllocator(num_blocks=8, block_size=4)
    kv.create("a")
    kv.reserve("a", 4)
    kv.commit("a", 4)
    kv.reserve("a", 5)
    assert kv.run("a") == (0, 3) and kv.pop_ops() == [] and kv.moves == 0


def test_a_blocked_session_moves_to_a_run_twice_its_size():
    kv = KVAllocator(num_blocks=16, block_size=4)
    arena = arena_for(kv)
    for sid, value in (("a", 1.0), ("b", 2.0)):
        kv.create(sid)
        grow(kv, arena, sid, 8, value)  # a: blocks 0-1, b: 2-3
    kv.reserve("a", 1)  # b sits right after a
    assert kv.run("a") == (4, 4)  # 2 blocks -> 4 (room to grow), after b
    assert kv.pop_ops() == [Move(0, 16, 8), Zero(0, 8)] and kv.moves == 1


def test_in_a_crowded_arena_a_moving_session_takes_only_what_it_needs():
    kv = KVAllocator(num_blocks=8, block_size=4)
    for sid, tokens in (("a", 8), ("b", 12)):  # a: blocks 0-1, b: 2-4; 3 free
        kv.create(sid)
        kv.reserve(sid, tokens)
        kv.commit(sid, tokens)
    kv.reserve("a", 1)
    assert kv.run("a") == (5, 3) and kv.free_blocks == 2  # not 4 blocks: that would leave 1 free


def test_scattered_free_blocks_are_compacted():
    kv = KVAllocator(num_blocks=8, block_size=2)
    arena = arena_for(kv)
    values = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    for sid, value in values.items():
        kv.create(sid)
        grow(kv, arena, sid, 4, value)  # 2 blocks each: the arena is full
    kv.free("b")
    kv.free("d")
    del values["b"], values["d"]
    arena.apply(kv.pop_ops())
    assert kv.free_blocks == 4  # blocks 2-3 and 6-7: no run of 3 after a, nor of 5 anywhere
    grow(kv, arena, "a", 6, 1.0)
    assert kv.run("a") == (0, 5) and kv.run("c") == (5, 2) and kv.moves == 1  # c made room after a
    check_arena(kv, arena, values)
    kv.free("a")
    kv.create("e")
    grow(kv, arena, "e", 12, 5.0)  # 6 blocks: free are 0-4 and 7, compaction puts the new session last
    assert kv.run("c") == (0, 2) and kv.run("e") == (2, 6)
    check_arena(kv, arena, {"c": 3.0, "e": 5.0})


def test_reserve_is_all_or_nothing_and_names_the_shortfall():
    kv = KVAllocator(num_blocks=3, block_size=4)
    kv.create("a")
    kv.reserve("a", 8)
    with pytest.raises(EngineFullError, match="needs 2 more blocks.*1 of 3 free"):
        kv.reserve("a", 13)  # rows beyond the committed 0: 4 blocks, 2 held
    assert kv.run("a") == (0, 2) and kv.free_blocks == 1


def test_commit_beyond_reservation_is_a_bug():
    kv = KVAllocator(num_blocks=2, block_size=4)
    kv.create("a")
    kv.reserve("a", 3)
    with pytest.raises(AssertionError):
        kv.commit("a", 5)


def test_free_zeroes_the_run_and_lru_orders_by_last_use():
    kv = KVAllocator(num_blocks=4, block_size=2)
    for sid in ("a", "b", "c"):
        kv.create(sid)
        kv.reserve(sid, 2)
    kv.touch("a")
    assert kv.lru_order() == ["b", "c", "a"]
    kv.pop_ops()
    assert kv.free("b") == 1 and kv.free("b") == 0
    assert kv.pop_ops() == [Zero(2, 2)]
    assert not kv.has("b") and kv.free_blocks == 2


def test_rename_copies_the_rows_into_the_targets_run_which_it_keeps():
    """A context roll switching in: the live session keeps the run it was promised; the rebuilt rows are copied in."""
    kv = KVAllocator(num_blocks=8, block_size=2)
    arena = arena_for(kv)
    kv.create("live", Reservation(8))
    grow(kv, arena, "live", 7, 1.0)
    kv.create("rebuilt")
    grow(kv, arena, "rebuilt", 3, 2.0)
    assert kv.run("live") == (0, 4) and kv.run("rebuilt") == (4, 2)
    kv.rename("rebuilt", "live")
    assert kv.sessions() == ["live"] and kv.run("live") == (0, 4) and kv.num_tokens("live") == 3
    assert kv.pop_ops() == [Move(8, 0, 3), Zero(8, 4)]
    arena.apply([Move(8, 0, 3), Zero(8, 4)])
    k, v = arena.keys(0, 0, 3)
    assert (k == 2.0).all() and (v == -2.0).all()
    assert (arena.k[:, :, 8:] == 0).all(), "the rebuilt run is free again, and zero"


def test_rename_into_a_run_too_small_hands_the_source_run_over():
    kv = KVAllocator(num_blocks=4, block_size=2)
    kv.create("live")
    kv.reserve("live", 1)
    kv.commit("live", 1)
    kv.create("rebuilt")
    kv.reserve("rebuilt", 3)
    kv.commit("rebuilt", 3)
    kv.pop_ops()
    kv.rename("rebuilt", "live")
    assert kv.sessions() == ["live"] and kv.run("live") == (1, 2) and kv.num_tokens("live") == 3
    assert kv.pop_ops() == [Zero(0, 2)]


def test_a_reservation_holds_its_run_from_creation_and_is_granted_only_with_its_headroom_free():
    kv = KVAllocator(num_blocks=8, block_size=4)
    live = Reservation(12, headroom=8)  # 3 blocks, and 2 must stay free
    kv.create("a", live)
    assert kv.run("a") == (0, 3) and kv.blocks_needed("a", 12) == 0 and kv.free_blocks == 5
    kv.create("b", live)
    assert kv.run("b") == (3, 3) and kv.free_blocks == 2
    with pytest.raises(EngineFullError, match="promised 4 tokens and 8 more kept free"):
        kv.create("c", Reservation(4, headroom=8))
    assert not kv.has("c") and kv.free_blocks == 2
    kv.create("roll", Reservation(8))  # the headroom is there for work without a headroom of its own
    assert kv.run("roll") == (6, 2) and kv.free_blocks == 0
    assert kv.pop_ops() == []


def test_admission_counts_promises_so_a_roll_holding_the_headroom_does_not_refuse_a_session_that_fits():
    kv = KVAllocator(num_blocks=8, block_size=4)
    live = Reservation(12, headroom=8)
    kv.create("a", live)
    kv.create("a#roll", Reservation(8))  # a roll in flight holds the headroom
    assert kv.free_blocks == 3
    kv.create("b", live)  # 6 of 8 blocks promised, 2 unpromised: admitted
    assert kv.run("b") == (5, 3) and kv.free_blocks == 0
    kv.free("a#roll")
    assert not kv.can_create(Reservation(4, headroom=8)), "one more would leave less than the headroom unpromised"
    assert kv.promised_tokens == 24, "the roll's KV is not a promise"
    with pytest.raises(SessionRefused, match="24 of 32 tokens are promised to 2 sessions, 8 free now") as refused:
        kv.create("c", Reservation(4, headroom=8))
    assert isinstance(refused.value, ReplicaFull), "the gateway places a refused new session on another replica"


def test_a_reservation_over_scattered_free_blocks_compacts_the_arena():
    kv = KVAllocator(num_blocks=6, block_size=2)
    for sid in ("a", "b", "c", "d"):
        kv.create(sid, Reservation(2))
        kv.commit(sid, 1)
    kv.free("b")  # free blocks: 1, 4, 5
    kv.pop_ops()
    kv.create("x", Reservation(6))
    assert [kv.run(sid) for sid in ("a", "c", "d", "x")] == [(0, 1), (1, 1), (2, 1), (3, 3)]
    # c and d slide down; d's old block (now x's) and the moved runs past their rows are zeroed
    assert kv.pop_ops() == [Move(4, 2, 1), Move(6, 4, 1), Zero(6, 2), Zero(3, 1), Zero(5, 1)]


def test_idle_time_is_measured_from_the_last_scheduled_work():
    now = [100.0]
    kv = KVAllocator(num_blocks=4, block_size=2, seconds=lambda: now[0])
    kv.create("a")
    now[0] = 103.0
    assert kv.idle_s("a") == 3.0
    kv.reserve("a", 1)
    now[0] = 104.5
    assert kv.idle_s("a") == 1.5


def test_bad_arena_sizes_are_rejected():
    with pytest.raises(ValueError):
        KVAllocator(0, 16)


def test_random_traffic_keeps_every_session_intact_and_free_rows_zero():
    """Create, grow, free sessions at random (moves and compactions included): after the decided ops, every
    session's rows are where its offset says and every row nobody owns is zero."""
    rng = random.Random(0)
    kv = KVAllocator(num_blocks=24, block_size=4, max_session_tokens=40)
    arena = arena_for(kv)
    values: dict[str, float] = {}
    for step in range(400):
        sid = f"s{rng.randrange(8)}"
        if sid in values and rng.random() < 0.15:
            kv.free(sid)
            del values[sid]
        else:
            n = rng.randint(1, 9)
            if sid in values and kv.num_tokens(sid) + n > 40:
                continue
            if kv.blocks_needed(sid, n) > kv.free_blocks:
                continue
            if sid not in values:
                kv.create(sid)
                values[sid] = float(step + 1)
            grow(kv, arena, sid, n, values[sid])
        arena.apply(kv.pop_ops())
        check_arena(kv, arena, values)
    assert kv.moves > 0


def test_arena_write_and_read_in_place():
    arena = KVArena(num_layers=2, num_blocks=4, block_size=2, num_kv_heads=3, head_dim=5, dtype=torch.float32,
                    device="cpu")  # fmt: skip
    k = torch.randn(3, 3, 5)
    v = torch.randn(3, 3, 5)
    arena.write(1, torch.tensor([4, 5, 6]), k, v)
    rk, rv = arena.keys(1, 4, 3)
    assert rk.shape == (3, 3, 5)  # (kv_heads, rows, head_dim), what attention reads
    assert torch.equal(rk, k.transpose(0, 1)) and torch.equal(rv, v.transpose(0, 1))
    assert rk.untyped_storage().data_ptr() == arena.k.untyped_storage().data_ptr()  # a view, not a copy
    assert torch.count_nonzero(arena.k[0]) == 0  # other layers untouched
    assert arena.scratch_row == 8 and arena.k.shape[2] == 10  # one scratch block past the allocator's blocks
    assert KVArena.bytes_per_token(28, 4, 128, torch.bfloat16) == 2 * 28 * 4 * 128 * 2
