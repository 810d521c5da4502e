"""The image processor alone: RGB conversion of every PIL mode, input checks, slicing layouts and placeholders."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.common.image_layout import IM_END, IM_ID_START, IM_START, SLICE_END, SLICE_START, UNK, ImageInputError, ImageProcessorConfig, image_placeholder, slice_layout
from services.vision_encoder.processor import load_image, preprocess, reshape_by_patch

CFG = ImageProcessorConfig()


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def noise(mode_size=(37, 23), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*mode_size[::-1], 3), dtype=np.uint8)


# ---- RGB conversion ------------------------------------------------------------------------------------------------


def test_rgba_drops_alpha_without_blending():
    rgba = np.dstack([noise(), np.zeros((23, 37), np.uint8)])  # fully transparent
    out = load_image(encode(Image.fromarray(rgba, "RGBA")))
    assert out.mode == "RGB" and out.size == (37, 23)
    np.testing.assert_array_equal(np.asarray(out), rgba[..., :3])


def test_grayscale_is_replicated():
    gray = noise()[..., 0]
    out = np.asarray(load_image(encode(Image.fromarray(gray, "L"))))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_palette_image_uses_its_palette():
    src = Image.fromarray(noise()).quantize(colors=16)
    assert src.mode == "P"
    out = load_image(encode(src))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(src.convert("RGB")))
    assert len(np.unique(np.asarray(out).reshape(-1, 3), axis=0)) <= 16


def test_cmyk_jpeg_converts_like_pil():
    src = Image.new("CMYK", (40, 30), (10, 200, 30, 40))
    data = encode(src, "JPEG")
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == "CMYK"
    np.testing.assert_array_equal(np.asarray(load_image(data)), np.asarray(decoded.convert("RGB")))


def test_16bit_png_converts_like_pil():
    values = np.array([[0, 100, 255, 256, 4000, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values))
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode in ("I;16", "I")
    out = load_image(data)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(decoded.convert("RGB")))
    # PIL clips 16-bit values to 8 bits (upstream's behaviour, kept).
    np.testing.assert_array_equal(np.asarray(out)[0, :, 0], [0, 100, 255, 255, 255, 255])


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F", "HSV"])
def test_every_pil_mode_in_memory(mode):
    src = Image.new(mode, (5, 3))
    out = load_image(src)
    assert out.mode == "RGB" and out.size == (5, 3)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(src.convert("RGB")))


# ---- bad input -----------------------------------------------------------------------------------------------------


def test_empty_bytes():
    with pytest.raises(ImageInputError, match="empty"):
        load_image(b"")


def test_undecodable_bytes():
    with pytest.raises(ImageInputError, match="cannot decode image"):
        load_image(b"definitely not an image" * 10)


def test_truncated_file():
    data = encode(Image.fromarray(noise((300, 200))))
    with pytest.raises(ImageInputError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])


def test_wrong_type():
    with pytest.raises(ImageInputError, match="expected encoded image bytes"):
        load_image("image.png")  # type: ignore[arg-type]


def test_zero_size():
    with pytest.raises(ImageInputError, match="zero size"):
        load_image(Image.new("RGB", (0, 10)))


def test_over_pixel_limit_is_rejected_before_decoding():
    data = encode(Image.new("RGB", (200, 100)))
    with pytest.raises(ImageInputError, match=r"200x100 = 20000 pixels, over this server's limit of 19999"):
        load_image(data, max_pixels=19_999)
    assert load_image(data, max_pixels=20_000).size == (200, 100)


def test_extreme_aspect_ratio():
    with pytest.raises(ImageInputError, match="aspect ratio"):
        slice_layout((10, 10 * int(CFG.max_aspect_ratio) + 10), 9, CFG)


@pytest.mark.parametrize("bad", [0, -1, CFG.max_slice_nums + 1, "3", 2.0, True])
def test_bad_max_slice_nums(bad):
    with pytest.raises(ImageInputError, match="max_slice_nums"):
        slice_layout((1000, 1000), bad, CFG)


def test_errors_are_value_errors():
    assert issubclass(ImageInputError, ValueError)


# ---- layouts and placeholders --------------------------------------------------------------------------------------

SIZES = [(1, 1), (100, 30), (320, 200), (448, 448), (449, 449), (640, 480), (896, 896), (1344, 896), (300, 1500),
         (1920, 1080), (4000, 300), (2480, 3508)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("msn", range(1, 10))
def test_layout_and_placeholder_agree(size, msn):
    layout = slice_layout(size, msn, CFG)
    q = CFG.query_num
    text = image_placeholder(layout, image_idx=3, use_image_id=True, query_num=q)
    assert text.startswith(f"{IM_ID_START}3</image_id>{IM_START}")
    assert text.count(IM_START) == text.count(IM_END) == 1
    assert text.count(UNK) == layout.n_slices * q
    assert len(layout.slice_sizes) == layout.n_slices
    for w, h in layout.slice_sizes:
        assert w % CFG.patch_size == 0 and h % CFG.patch_size == 0 and w > 0 and h > 0
    if layout.grid is None:
        assert layout.n_slices == 1 and SLICE_START not in text
    else:
        cols, rows = layout.grid
        assert 2 <= cols * rows <= msn
        assert text.count(SLICE_START) == text.count(SLICE_END) == cols * rows
        assert text.count("\n") == rows - 1
        assert all(line.count(SLICE_START) == cols for line in text.split(IM_END, 1)[1].split("\n"))
    no_id = image_placeholder(layout, image_idx=3, use_image_id=False, query_num=q)
    assert no_id == text.split("</image_id>", 1)[1]


def test_small_images_are_never_sliced():
    for msn in range(1, 10):
        assert slice_layout((448, 448), msn, CFG).grid is None
    assert slice_layout((2000, 2000), 1, CFG).grid is None


def test_grid_follows_aspect_ratio():
    assert slice_layout((896, 896), 9, CFG).grid == (2, 2)  # 4x the area, square
    assert slice_layout((1800, 450), 9, CFG).grid == (4, 1)  # wide strip
    assert slice_layout((450, 1800), 9, CFG).grid == (1, 4)


@pytest.mark.parametrize("size", [(320, 200), (1344, 896), (300, 1500), (17, 900)])
def test_preprocess_shapes(size):
    image = Image.fromarray(noise(size))
    pre = preprocess(image, 9, CFG)
    assert len(pre.pixels_u8) == pre.layout.n_slices == len(pre.tgt_sizes)
    p = CFG.patch_size
    for pixels, floats, (w, h), (rows, cols) in zip(
        pre.pixels_u8, pre.pixel_values(), pre.layout.slice_sizes, pre.tgt_sizes, strict=True
    ):
        assert (rows, cols) == (h // p, w // p)
        assert pixels.dtype == np.uint8 and pixels.shape == (3, p, rows * cols * p)
        assert floats.dtype == np.float32 and floats.shape == pixels.shape
        assert floats.min() >= -1.0 and floats.max() <= 1.0


def test_slices_are_crops_of_the_refine_image_row_major():
    image = Image.fromarray(noise((1344, 896)))
    pre = preprocess(image, 9, CFG)
    cols, rows = pre.layout.grid
    refine = np.asarray(image.resize(pre.layout.refine_size, Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    w, h = pre.layout.slice_sizes[1]
    for r in range(rows):
        for c in range(cols):
            crop = refine[:, r * h : (r + 1) * h, c * w : (c + 1) * w]
            np.testing.assert_array_equal(pre.pixels_u8[1 + r * cols + c], reshape_by_patch(crop, CFG.patch_size))


def test_reshape_by_patch_order():
    """Token k holds patch (k // cols, k % cols); its pixel row r is at [:, r, k*p:(k+1)*p]."""
    p, rows, cols = 2, 2, 3
    chw = np.arange(3 * rows * p * cols * p).reshape(3, rows * p, cols * p)
    out = reshape_by_patch(chw, p)
    assert out.shape == (3, p, rows * cols * p)
    for k in range(rows * cols):
        i, j = divmod(k, cols)
        np.testing.assert_array_equal(out[:, :, k * p : (k + 1) * p], chw[:, i * p : (i + 1) * p, j * p : (j + 1) * p])


def test_non_rgb_image_is_converted_by_preprocess():
    gray = Image.fromarray(noise((50, 40))[..., 0], "L")
    a = preprocess(gray, 1, CFG)
    b = preprocess(gray.convert("RGB"), 1, CFG)
    np.testing.assert_array_equal(a.pixels_u8[0], b.pixels_u8[0])
