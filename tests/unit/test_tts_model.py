"""ConditionalChatTTS building blocks: the batched streaming mask equals upstream's per-step mask, the KV cache."""

from __future__ import annotations

import torch

from services.common.config import ModelConfig
from services.tts_decoder.model import KVCache, batch_visibility, streaming_visibility
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


def test_kv_cache_stack_keeps_rows_and_writes_through_views():
    caches = [KVCache.zeros(2, 2, 4, 8, torch.float32, "cpu") for _ in range(2)]
    for i, c in enumerate(caches):
        for layer in range(2):
            c.keys[layer][0, :, :5] = i + 1.0
    batch = KVCache.stack(caches, [5, 3], capacity=12)
    assert batch.keys[0].shape == (2, 2, 12, 4)
    assert torch.all(batch.keys[1][0, :, :5] == 1) and torch.all(batch.keys[1][1, :, :3] == 2)
    assert torch.all(batch.keys[1][1, :, 3:] == 0)  # only each row's own length is carried over
    batch.bind(torch.tensor([[6], [4]]), kv_len=7)
    k, _ = batch.update(torch.full((2, 2, 1, 4), 9.0), torch.zeros(2, 2, 1, 4), 0)
    assert k.shape == (2, 2, 7, 4)
    assert torch.all(caches[0].keys[0][0, :, 6] == 9) and torch.all(caches[1].keys[0][0, :, 4] == 9)
