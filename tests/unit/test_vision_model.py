"""Vision model structure and batching: official key names at the real config, positions, N in one call == N calls."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.checkpoint import UNUSED_AT_INFERENCE
from services.common.config import real_config
from services.vision_encoder.encoder import ImageEmbedder
from services.vision_encoder.model import PREFIXES, Resampler, VisionModel, sincos_1d
from services.common.image_layout import ImageInputError


def test_state_dict_equals_official_keys_at_real_config(golden):
    official = json.loads(golden.path("official_keys.json").read_text())["shapes"]
    unused = tuple(UNUSED_AT_INFERENCE)
    expected = {k: tuple(v) for k, v in official.items() if k.startswith(PREFIXES) and not k.startswith(unused)}
    with torch.device("meta"):
        model = VisionModel(real_config())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == [], "missing"
    assert sorted(set(ours) - set(expected)) == [], "unexpected"
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}


def test_drop_vision_last_layer_builds_one_layer_less():
    cfg = real_config()
    with torch.device("meta"):
        kept = VisionModel(cfg)
        dropped = VisionModel(cfg.replace(drop_vision_last_layer=True))
    assert len(dropped.vpm.encoder.layers) == len(kept.vpm.encoder.layers) - 1 == cfg.vision.num_hidden_layers - 1


def _upstream_2d_table(embed_dim: int, h: int, w: int) -> np.ndarray:
    """Upstream's get_2d_sincos_pos_embed layout, written out: meshgrid(w, h), first half encodes grid[0]."""
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)), axis=0)
    half = embed_dim // 2
    first = sincos_1d(max(h, w), half)[grid[0].astype(int)]
    second = sincos_1d(max(h, w), half)[grid[1].astype(int)]
    return np.concatenate([first, second], axis=-1)  # (h, w, D)


def test_resampler_positions_grow_past_the_initial_table():
    dim = 32
    resampler = Resampler(num_queries=4, embed_dim=dim, num_heads=2, kv_dim=8, min_table_size=70)
    tgt = torch.tensor([[72, 3], [2, 75], [5, 5]])
    length = int((tgt[:, 0] * tgt[:, 1]).max())
    pos = resampler.position_embedding(tgt, length, torch.device("cpu"))
    for i, (h, w) in enumerate(tgt.tolist()):
        np.testing.assert_array_equal(pos[i, : h * w].numpy(), _upstream_2d_table(dim, h, w).reshape(h * w, dim))
        assert not pos[i, h * w :].any()


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    sizes = [(320, 200), (700, 500), (200, 900), (448, 448), (1000, 300)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


@pytest.fixture(scope="module")
def encoder(golden) -> ImageEmbedder:
    return ImageEmbedder.from_checkpoint(golden.checkpoint, batch_size=4)


def test_n_images_in_one_call_equal_n_calls(encoder):
    images = _images(5)
    together = encoder.encode(images, max_slice_nums=4)
    alone = [encoder.encode([im], max_slice_nums=4)[0] for im in images]
    assert sum(e.layout.n_slices for e in together) > encoder.batch_size  # slices of one image span batches
    for t, a in zip(together, alone, strict=True):
        assert t.layout == a.layout
        rows = t.layout.n_slices * encoder.processor_cfg.query_num
        assert t.embeddings.shape == (rows, encoder.model.resampler.embed_dim)
        # Same math; only padding length and batch shape differ, so equal up to float32 rounding.
        torch.testing.assert_close(t.embeddings, a.embeddings, rtol=0, atol=1e-5)


def test_bad_image_fails_the_call_before_compute(encoder):
    with pytest.raises(ImageInputError):
        encoder.encode([_images(1)[0], b"\x89PNG not really"])


def test_bfloat16_runs_close_to_float32(golden, encoder):
    bf16 = ImageEmbedder.from_checkpoint(golden.checkpoint, dtype=torch.bfloat16)
    image = _images(1)
    ref = encoder.encode(image, max_slice_nums=1)[0].embeddings
    out = bf16.encode(image, max_slice_nums=1)[0].embeddings
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel
