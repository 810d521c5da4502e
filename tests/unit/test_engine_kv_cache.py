"""Pooled KV bookkeeping (BlockManager) and storage (KVPool), without a model."""

from __future__ import annotations

import pytest
import torch

from services.llm_core.engine.kv_cache import BlockManager, EngineFullError, KVPool


def test_reserve_commit_and_slots_follow_the_block_table():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.create("a")
    bm.create("b")
    bm.reserve("a", 6)  # 2 blocks
    bm.reserve("b", 1)  # 1 block
    bm.commit("a", 6)
    bm.commit("b", 1)
    assert bm.num_tokens("a") == 6 and bm.num_tokens("b") == 1
    a_blocks = bm.blocks("a")
    assert len(a_blocks) == 2 and not set(a_blocks) & set(bm.blocks("b"))
    assert bm.slots("a", 3, 3) == [a_blocks[0] * 4 + 3, a_blocks[1] * 4, a_blocks[1] * 4 + 1]
    # growing within the reserved block needs nothing; crossing the boundary needs one more
    assert bm.blocks_needed("a", 2) == 0 and bm.blocks_needed("a", 3) == 1
    assert bm.free_blocks == 5 and bm.used_tokens == 7 and bm.capacity_tokens == 32


def test_reserve_is_all_or_nothing_and_names_the_shortfall():
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.create("a")
    bm.reserve("a", 8)
    with pytest.raises(EngineFullError, match="needs 2 more blocks.*1 of 3 free"):
        bm.reserve("a", 13)  # rows beyond the committed 0: 4 blocks, 2 held
    assert len(bm.blocks("a")) == 2 and bm.free_blocks == 1


def test_commit_beyond_reservation_is_a_bug():
    bm = BlockManager(num_blocks=2, block_size=4)
    bm.create("a")
    bm.reserve("a", 3)
    with pytest.raises(AssertionError):
        bm.commit("a", 5)


def test_free_returns_blocks_for_reuse_and_lru_orders_by_last_use():
    bm = BlockManager(num_blocks=4, block_size=2)
    for sid in ("a", "b", "c"):
        bm.create(sid)
        bm.reserve(sid, 2)
    bm.touch("a")
    assert bm.lru_order() == ["b", "c", "a"]
    assert bm.free("b") == 1 and bm.free("b") == 0
    assert not bm.has("b") and bm.free_blocks == 2
    bm.create("d")
    bm.reserve("d", 4)
    assert bm.free_blocks == 0


def test_bad_pool_sizes_are_rejected():
    with pytest.raises(ValueError):
        BlockManager(0, 16)


def test_pool_write_then_read_in_sdpa_layout():
    pool = KVPool(num_layers=2, num_blocks=4, block_size=2, num_kv_heads=3, head_dim=5, dtype=torch.float32,
                  device="cpu")
    k = torch.randn(3, 3, 5)
    v = torch.randn(3, 3, 5)
    slots = torch.tensor([6, 1, 2])
    pool.write(1, slots, k, v)
    rk, rv = pool.read(1, torch.tensor([[6, 1, 2], [2, 2, 6]]))
    assert rk.shape == (2, 3, 3, 5)  # (B, kv_heads, L, head_dim)
    assert torch.equal(rk[0], k.transpose(0, 1)) and torch.equal(rv[0], v.transpose(0, 1))
    assert torch.equal(rk[1, :, 2], k[0])
    assert torch.count_nonzero(pool.k[0]) == 0  # other layers untouched
    assert KVPool.bytes_per_token(28, 4, 128, torch.bfloat16) == 2 * 28 * 4 * 128 * 2
