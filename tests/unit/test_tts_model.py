"""ConditionalChatTTS building blocks: the batched streaming mask equals upstream's per-step mask; the KV pool hands
out zeroed slots lowest first and its spans write only the kept entries, in place."""

from __future__ import annotations

import pytest
import torch

from services.common.config import ModelConfig
from services.runtime.errors import ResourceExhausted
from services.tts_decoder.kv_pool import KVPool, KVPoolFullError
from services.tts_decoder.model import batch_visibility, streaming_visibility
from services.tts_decoder.text import ChatTTSText


def test_batch_visibility_equals_the_per_step_mask(golden):
    cfg = ModelConfig.from_model_dir(golden.checkpoint).tts
    text = ChatTTSText(golden.checkpoint, cfg)
    pasts = torch.tensor([302, 303, 326, 327, 351, 352, 401, 640, 700, 1302, 2400])
    masks = torch.stack([text.text_mask(n) for n in (0, 3, 9, 10, 31, 120, 200, 298, 12, 55, 7)])
    kv_len = int(pasts.max()) + 1
    batched = batch_visibility(pasts, masks, kv_len, cfg)
    for row, (past, mask) in enumerate(zip(pasts.tolist(), masks)):
        single = streaming_visibility(past, 1, mask, cfg)
        assert torch.equal(batched[row, : past + 1], single)
        assert not batched[row, past + 1 :].any()


def test_kv_pool_slots_are_zeroed_lowest_first_and_bounded():
    pool = KVPool(layers=2, heads=2, head_dim=4, capacity=8, slots=3, dtype=torch.float32, device="cpu")
    assert [pool.acquire() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KVPoolFullError, match="all 3 speech slots") as err:
        pool.acquire()
    assert isinstance(err.value, ResourceExhausted)
    pool.keys[1][1].fill_(5.0)
    pool.values[0][1].fill_(5.0)
    pool.release(2)
    pool.release(1)
    assert pool.in_use == 1
    assert pool.acquire() == 1  # the lowest free slot, keeping busy slots together
    assert not pool.keys[1][1].any() and not pool.values[0][1].any()  # a new segment starts from zeros


def test_slot_span_writes_kept_entries_in_place_and_reads_the_first_kv_len():
    pool = KVPool(layers=2, heads=2, head_dim=4, capacity=8, slots=4, dtype=torch.float32, device="cpu")
    for _ in range(4):
        pool.acquire()
    # Rows 1..3 of the pool, two new entries each; row 2 (slot 2) idles, row 3 keeps only its first entry.
    positions = torch.tensor([[3, 4], [0, 0], [6, 7]])
    written = torch.tensor([[True, True], [False, False], [True, False]])
    span = pool.span(1, 4, positions, kv_len=6, written=written)
    new_k = torch.arange(1.0, 7.0).view(3, 1, 2, 1).expand(3, 2, 2, 4)  # (B, heads, q, head_dim): 1..6 by entry
    k, v = span.update(new_k, -new_k, layer=1)
    assert k.shape == v.shape == (3, 2, 6, 4)
    keys = pool.keys[1]
    assert torch.all(keys[1, :, 3] == 1) and torch.all(keys[1, :, 4] == 2)
    assert torch.all(keys[3, :, 6] == 5) and not keys[3, :, 7].any()  # the dropped entry is not written
    assert not keys[2].any() and not keys[0].any()  # the idle row and the slot outside the span are untouched
    assert torch.all(pool.values[1][1, :, 3] == -1)
    assert not pool.keys[0].any()  # other layers untouched
    k[0, 0, 0, 0] = 9.0  # the returned KV is a view of the pool, not a copy
    assert keys[1, 0, 0, 0] == 9.0
