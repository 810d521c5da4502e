"""Parity of the vision path with upstream: golden cases a_image_preprocess and b_vision.

Case a: our processor on the input images (layout, uint8 pixels, normalised floats, tgt_sizes, placeholders).
Case b: vpm + resampler on all slices of the case-a images (msn 9) in one batch, built from OUR processor output
as the case describes; then the same through `ImageEmbedder.encode` at several batch sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.vision_encoder.encoder import ImageEmbedder, collate_slices
from services.vision_encoder.model import bucketed_position_ids, load_vision_model, patch_attention_mask
from services.common.image_layout import ImageProcessorConfig, image_placeholder
from services.vision_encoder.processor import load_image, preprocess

A, B = "a_image_preprocess", "b_vision"


@pytest.fixture(scope="module")
def cfg(golden) -> ImageProcessorConfig:
    return ImageProcessorConfig.from_model_dir(golden.checkpoint)


def _image_bytes(golden, meta: dict) -> bytes:
    return golden.path(meta["image"]).read_bytes()


def _b_images(golden) -> list[dict]:
    """Case b's images in its slice order: the case-a entries sliced with max_slice_nums 9, in case-a order."""
    return [meta for key, meta in golden.cases[A]["images"].items() if meta["max_slice_nums"] == 9]


def test_image_preprocess(golden, cfg):
    checked = set()
    for key, meta in golden.cases[A]["images"].items():
        image = load_image(_image_bytes(golden, meta))
        assert [list(image.size)] == meta["image_sizes"]
        pre = preprocess(image, meta["max_slice_nums"], cfg)
        layout = pre.layout

        expected_grid = meta["grid_cols_rows"]
        assert layout.grid == (tuple(expected_grid) if expected_grid else None), key
        assert layout.n_slices == meta["n_slices"], key
        assert [list(s) for s in layout.slice_sizes] == meta["slice_sizes_wh"], key

        golden.check(f"{key}.tgt_sizes", pre.tgt_sizes)
        checked.add(f"{key}.tgt_sizes")
        for i, pixels in enumerate(pre.pixels_u8):
            name = f"{key}.slice{i}.pixel_u8"
            if name not in golden.tensors:  # stored once: this run's single slice equals another entry's slice 0
                assert i == 0 and meta["pixel_tensor_same_as"], name
                name = meta["pixel_tensor_same_as"]
            golden.check(name, pixels)
            checked.add(name)

        # The float input, against the reference float tensor's float64 sum and sum of squares.
        for floats, sums in zip(pre.pixel_values(), meta["float_pixel_checksums_float64"], strict=True):
            assert floats.dtype == np.float32
            f64 = floats.astype(np.float64)
            assert f64.sum() == pytest.approx(sums["sum"], rel=1e-12, abs=1e-6)
            assert (f64**2).sum() == pytest.approx(sums["sum_sq"], rel=1e-12)

        for label, text in meta["placeholders"].items():
            flags = dict(part.split("=") for part in label.split(","))
            ours = image_placeholder(layout, int(flags["image_idx"]), flags["use_image_id"] == "True", cfg.query_num)
            assert ours == text, (key, label)
    assert checked == set(golden.names(A))


def test_normalised_pixels_follow_the_reference_formula(golden, cfg):
    """The float32 model input is the documented formula applied to the reference uint8 pixels, bit for bit."""
    meta = golden.cases[A]["images"]["a.big.msn9"]
    pre = preprocess(load_image(_image_bytes(golden, meta)), meta["max_slice_nums"], cfg)
    mean = np.asarray(cfg.norm_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.norm_std, dtype=np.float32)[:, None, None]
    for i, floats in enumerate(pre.pixel_values()):
        u8 = golden[f"a.big.msn9.slice{i}.pixel_u8"].numpy()
        np.testing.assert_array_equal(floats, (u8.astype(np.float32) / np.float32(255) - mean) / std)


@pytest.fixture(scope="module")
def b_inputs(golden, cfg):
    pres = [preprocess(load_image(_image_bytes(golden, m)), m["max_slice_nums"], cfg) for m in _b_images(golden)]
    pixels = [p for pre in pres for p in pre.pixel_values()]
    pixel_values, tgt_sizes = collate_slices(pixels, [pre.tgt_sizes for pre in pres])
    assert pixel_values.shape[0] == golden.cases[B]["n_slices"]
    return pixel_values, tgt_sizes


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_vision_model(golden, b_inputs, attn):
    pixel_values, tgt_sizes = b_inputs
    model = load_vision_model(golden.checkpoint, attn_implementation=attn)
    patch = model.vpm.embeddings.patch_size
    num_patches = pixel_values.shape[-1] // patch
    golden.check("b.vpm.tgt_sizes", tgt_sizes)
    golden.check("b.vpm.patch_attention_mask", patch_attention_mask(tgt_sizes, num_patches))
    golden.check(
        "b.vpm.position_ids",
        bucketed_position_ids(tgt_sizes, num_patches, model.vpm.embeddings.num_patches_per_side),
    )
    with torch.inference_mode():
        hidden = model.vpm(pixel_values, tgt_sizes)
        golden.check("b.vpm.last_hidden_state", hidden)
        golden.check("b.resampler.out", model.resampler(hidden, tgt_sizes))


@pytest.mark.parametrize("batch_size", [16, 5, 1])
def test_encoder_matches_reference(golden, batch_size):
    """`encode` (own batching and padding) gives the reference resampler rows for every image's slices."""
    encoder = ImageEmbedder.from_checkpoint(golden.checkpoint, batch_size=batch_size)
    metas = _b_images(golden)
    encoded = encoder.encode([_image_bytes(golden, m) for m in metas], max_slice_nums=metas[0]["max_slice_nums"])
    per_slice = torch.cat([e.embeddings for e in encoded]).reshape(golden["b.resampler.out"].shape)
    golden.check("b.resampler.out", per_slice)
    for enc, meta in zip(encoded, metas, strict=True):
        assert enc.layout.n_slices == meta["n_slices"]
        assert enc.placeholder(1, True) == meta["placeholders"]["use_image_id=True,image_idx=1"]
        assert enc.placeholder(0, False) == meta["placeholders"]["use_image_id=False,image_idx=0"]
