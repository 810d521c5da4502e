"""Image pixels as upstream's MiniCPMVImageProcessor makes them: decode, RGB, slice, patch layout, normalise.

The slicing geometry and placeholders (what the gateway also needs, from an image's size alone) are in
`services.common.image_layout`. Each slice's side lengths are multiples of the patch size; its pixels are laid
out patch by patch as (3, patch, H*W/patch).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from services.common.image_layout import (
    DEFAULT_MAX_PIXELS,
    ImageInputError,
    ImageProcessorConfig,
    SliceLayout,
    check_image_size,
    probe_image,
    slice_layout,
)


@dataclass
class PreprocessedImage:
    """One image ready for the encoder: per slice uint8 pixels in patch layout (3, patch, H*W/patch)."""

    layout: SliceLayout
    pixels_u8: list[np.ndarray]
    tgt_sizes: np.ndarray  # (n_slices, 2) int64: (H/patch, W/patch) per slice
    norm_mean: tuple[float, float, float]
    norm_std: tuple[float, float, float]

    def pixel_values(self) -> list[np.ndarray]:
        """Float32 model input per slice: /255 then mean/std, computed in float32 as upstream."""
        return [normalize(p, self.norm_mean, self.norm_std) for p in self.pixels_u8]


# ---- input checks and RGB conversion ------------------------------------------------------------------------------


def load_image(data: bytes | bytearray | memoryview | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode (if bytes), check size and convert to RGB exactly as upstream (`PIL.Image.convert("RGB")`).

    No EXIF rotation and no alpha compositing: upstream applies neither (alpha is dropped, not blended).
    """
    if isinstance(data, Image.Image):
        image = data
    elif isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
        probe_image(data, ImageProcessorConfig(max_pixels=max_pixels))  # header checks before any decoding
        image = Image.open(io.BytesIO(data))
    else:
        raise ImageInputError(f"expected encoded image bytes or a PIL image, got {type(data).__name__}")
    check_image_size(image.size, max_pixels)
    try:
        image.load()  # decode now so a truncated file fails here, not deep in resize
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageInputError(f"image data is truncated or corrupt ({type(e).__name__}); re-encode and resend the file") from e
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageInputError(
            f"cannot convert an image of PIL mode {image.mode!r} to RGB ({type(e).__name__}); send an RGB image"
        ) from e


# ---- pixels --------------------------------------------------------------------------------------------------------


def slice_images(image: Image.Image, layout: SliceLayout) -> list[Image.Image]:
    """The resized source image, then the grid crops of the refine image, row-major (PIL bicubic as upstream)."""
    slices = [image.resize(layout.source_size, resample=Image.Resampling.BICUBIC)]
    if layout.grid:
        refine = image.resize(layout.refine_size, resample=Image.Resampling.BICUBIC)
        (cols, rows), (cell_w, cell_h) = layout.grid, layout.slice_sizes[1]
        for r in range(rows):
            for c in range(cols):
                slices.append(refine.crop((c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h)))
    return slices


def reshape_by_patch(chw: np.ndarray, patch_size: int) -> np.ndarray:
    """(C, H, W) -> (C, patch, H*W/patch): patches in row-major order, each contributing its `patch` pixel rows.

    Same element order as upstream's `torch.nn.functional.unfold` based `reshape_by_patch`.
    """
    c, height, width = chw.shape
    h, w = height // patch_size, width // patch_size
    x = chw[:, : h * patch_size, : w * patch_size].reshape(c, h, patch_size, w, patch_size)
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3, 4)).reshape(c, patch_size, h * w * patch_size)


def normalize(pixels_u8: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    mean32 = np.asarray(mean, dtype=np.float32)[:, None, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None, None]
    return (pixels_u8.astype(np.float32) / np.float32(255) - mean32) / std32


def preprocess(image: Image.Image, max_slice_nums: int | None, cfg: ImageProcessorConfig) -> PreprocessedImage:
    """Slice an image and lay its pixels out for the encoder (upstream `MiniCPMVImageProcessor.preprocess`)."""
    image = to_rgb(image) if image.mode != "RGB" else image
    layout = slice_layout(image.size, max_slice_nums, cfg)
    patch = cfg.patch_size
    pixels = [
        reshape_by_patch(np.asarray(s, dtype=np.uint8).transpose(2, 0, 1), patch) for s in slice_images(image, layout)
    ]
    tgt_sizes = np.array([(h // patch, w // patch) for w, h in layout.slice_sizes], dtype=np.int64)
    return PreprocessedImage(layout, pixels, tgt_sizes, cfg.norm_mean, cfg.norm_std)
