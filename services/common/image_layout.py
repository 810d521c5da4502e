"""What an image becomes for the model, without decoding it: the slicing geometry of upstream's
MiniCPMVImageProcessor (grid, resizes, placeholders) and the checks an image must pass.

Pure PIL/numpy on the image's SIZE only, shared by the gateway (which builds prompts from an image's header,
never decoding its pixels) and the vision encoder (which decodes and slices the pixels the same way).

An image becomes 1 + cols*rows "slices": the whole image resized to about scale_resolution² pixels (always first),
then, if the image is big enough to be sliced, a grid of crops of a second, larger resize, row-major.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from services.common.config import ModelConfig
from services.runtime.errors import InvalidArgument

# Placeholder tokens (upstream defaults; the tokenizer defines each as one special token).
IM_START, IM_END = "<image>", "</image>"
SLICE_START, SLICE_END = "<slice>", "</slice>"
IM_ID_START, IM_ID_END = "<image_id>", "</image_id>"
UNK = "<unk>"

# Guards against decompression bombs; an 8K frame (7680x4320) is well inside.
DEFAULT_MAX_PIXELS = 40_000_000
# Beyond about 1:1000 a side falls under one patch and slices stop shrinking; 1:200 keeps every slice near
# scale_resolution² pixels (cost like any other image) while allowing long screenshots and receipts.
DEFAULT_MAX_ASPECT_RATIO = 200.0


class ImageInputError(InvalidArgument):
    """An image the service cannot take; the message says what is wrong and what to send instead."""


@dataclass(frozen=True)
class ImageProcessorConfig:
    """What the processor reads from `preprocessor_config.json` (upstream names in comments)."""

    max_slice_nums: int = 9  # also the most a request may ask for
    scale_resolution: int = 448
    patch_size: int = 14
    query_num: int = 64  # image_feature_size: <unk> tokens per slice
    use_image_id: bool = False
    norm_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    norm_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **overrides) -> "ImageProcessorConfig":
        fields = dict(
            max_slice_nums=cfg.slice.max_slice_nums,
            scale_resolution=cfg.slice.scale_resolution,
            patch_size=cfg.patch_size,
            query_num=cfg.query_num,
            use_image_id=cfg.use_image_id,
        )
        return cls(**{**fields, **overrides})

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, **overrides) -> "ImageProcessorConfig":
        """From `preprocessor_config.json`, checked against `config.json` the way upstream `chat` asserts."""
        model_cfg = ModelConfig.from_model_dir(model_dir)
        if not model_cfg.slice_mode:
            raise ValueError(f"{model_dir}/config.json: slice_mode=false is not supported (every MiniCPM-o 2.6 slices)")
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.is_file():
            return cls.from_model_config(model_cfg, **overrides)
        pre = json.loads(path.read_text())
        cfg = cls(
            max_slice_nums=int(pre.get("max_slice_nums", cls.max_slice_nums)),
            scale_resolution=int(pre.get("scale_resolution", cls.scale_resolution)),
            patch_size=int(pre.get("patch_size", cls.patch_size)),
            query_num=int(pre.get("image_feature_size", cls.query_num)),
            use_image_id=bool(pre.get("use_image_id", cls.use_image_id)),
            norm_mean=tuple(pre.get("norm_mean", cls.norm_mean)),
            norm_std=tuple(pre.get("norm_std", cls.norm_std)),
        )
        expected = cls.from_model_config(model_cfg)
        for name in ("max_slice_nums", "patch_size", "query_num", "use_image_id"):
            if getattr(cfg, name) != getattr(expected, name):
                raise ValueError(
                    f"{path}: {name}={getattr(cfg, name)!r} disagrees with config.json ({getattr(expected, name)!r}); "
                    "make preprocessor_config.json match the model config"
                )
        if pre.get("slice_mode", True) is not True:
            raise ValueError(f"{path}: slice_mode must be true, as in config.json")
        return cls(**{**cfg.__dict__, **overrides})


@dataclass(frozen=True)
class SliceLayout:
    """How one image is cut: sizes are (width, height) in pixels; `grid` is (cols, rows) or None (no slicing)."""

    image_size: tuple[int, int]
    source_size: tuple[int, int]
    grid: tuple[int, int] | None = None
    refine_size: tuple[int, int] | None = None

    @property
    def n_slices(self) -> int:
        return 1 + (self.grid[0] * self.grid[1] if self.grid else 0)

    @property
    def slice_sizes(self) -> list[tuple[int, int]]:
        """(w, h) of every slice, source image first."""
        if not self.grid:
            return [self.source_size]
        (cols, rows), (w, h) = self.grid, self.refine_size
        return [self.source_size] + [(w // cols, h // rows)] * (cols * rows)


def probe_image(data: bytes, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """(width, height) read from the file's header, checked against the limits, without decoding the pixels
    (a 40 MP PNG costs microseconds here, seconds to decode)."""
    if not data:
        raise ImageInputError("image is empty (0 bytes); send the encoded file bytes (PNG, JPEG, WebP, ...)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
    except Image.DecompressionBombError as e:
        raise ImageInputError(f"image has too many pixels; downscale it below {cfg.max_pixels} pixels") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageInputError(
            f"cannot decode image ({len(data)} bytes): not a supported image file ({type(e).__name__}); "
            "send PNG, JPEG, WebP, GIF, BMP or TIFF bytes"
        ) from e
    check_image_size(size, cfg.max_pixels)
    return size


def check_image_size(size_wh: tuple[int, int], max_pixels: int) -> None:
    w, h = size_wh
    if w <= 0 or h <= 0:
        raise ImageInputError(f"image has zero size ({w}x{h}); send an image at least 1x1 pixel")
    if w * h > max_pixels:
        raise ImageInputError(
            f"image is {w}x{h} = {w * h} pixels, over this server's limit of {max_pixels}; downscale it first"
        )


def check_max_slice_nums(max_slice_nums: int, cfg: ImageProcessorConfig) -> int:
    if isinstance(max_slice_nums, bool) or not isinstance(max_slice_nums, (int, np.integer)):
        raise ImageInputError(f"max_slice_nums must be an integer, got {max_slice_nums!r}")
    if not 1 <= max_slice_nums <= cfg.max_slice_nums:
        raise ImageInputError(
            f"max_slice_nums={max_slice_nums} is outside 1..{cfg.max_slice_nums}, the slices per image this "
            "server allows; ask for fewer slices"
        )
    return int(max_slice_nums)


# ---- slicing geometry (upstream `get_sliced_grid`, `find_best_resize`, `get_refine_size`) ---------------------------


def _ensure_divide(length: float, patch_size: int) -> int:
    # Python's round (half to even) is what upstream uses.
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(
    size_wh: tuple[float, float], scale_resolution: int, patch_size: int, allow_upscale: bool = False
) -> tuple[int, int]:
    """Keep the aspect ratio, bring the area to about scale_resolution², round sides to the patch size."""
    width, height = size_wh
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        r = width / height
        height = int(scale_resolution / math.sqrt(r))
        width = int(height * r)
    return _ensure_divide(width, patch_size), _ensure_divide(height, patch_size)


def get_refine_size(
    size_wh: tuple[int, int], grid: tuple[int, int], scale_resolution: int, patch_size: int
) -> tuple[int, int]:
    """Size of the image the grid is cut from: each cell best-resized (upscaling allowed), times the grid."""
    width, height = size_wh
    cols, rows = grid
    cell_w = _ensure_divide(width, cols) / cols
    cell_h = _ensure_divide(height, rows) / rows
    best_w, best_h = find_best_resize((cell_w, cell_h), scale_resolution, patch_size, allow_upscale=True)
    return best_w * cols, best_h * rows


def get_sliced_grid(size_wh: tuple[int, int], max_slice_nums: int, scale_resolution: int) -> tuple[int, int] | None:
    """(cols, rows) whose aspect ratio is closest (in log) to the image's, among slice counts near its area ratio."""
    width, height = size_wh
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1:
        return None
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    candidates = [(m, n // m) for n in counts for m in range(1, n + 1) if n % m == 0]
    # First minimum wins on ties, as upstream's strict `<` scan.
    return min(candidates, key=lambda g: abs(log_ratio - math.log(g[0] / g[1])))


def slice_layout(size_wh: tuple[int, int], max_slice_nums: int | None, cfg: ImageProcessorConfig) -> SliceLayout:
    """The slicing of an image of `size_wh` (width, height) for `max_slice_nums` (None: the config's)."""
    max_slice_nums = check_max_slice_nums(cfg.max_slice_nums if max_slice_nums is None else max_slice_nums, cfg)
    w, h = size_wh
    check_image_size(size_wh, cfg.max_pixels)
    if max(w, h) / min(w, h) > cfg.max_aspect_ratio:
        raise ImageInputError(
            f"image aspect ratio {w}x{h} is more extreme than 1:{cfg.max_aspect_ratio:g}; crop or pad it"
        )
    grid = get_sliced_grid(size_wh, max_slice_nums, cfg.scale_resolution)
    if grid is None:
        source = find_best_resize(size_wh, cfg.scale_resolution, cfg.patch_size, allow_upscale=True)
        return SliceLayout(image_size=(w, h), source_size=source)
    source = find_best_resize(size_wh, cfg.scale_resolution, cfg.patch_size)
    refine = get_refine_size(size_wh, grid, cfg.scale_resolution, cfg.patch_size)
    return SliceLayout(image_size=(w, h), source_size=source, grid=grid, refine_size=refine)


def image_placeholder(layout: SliceLayout, image_idx: int = 0, use_image_id: bool = True, query_num: int = 64) -> str:
    """Upstream `get_slice_image_placeholder`: [<image_id>i</image_id>] <image>unk*q</image> then the grid rows."""
    text = f"{IM_ID_START}{image_idx}{IM_ID_END}" if use_image_id else ""
    text += IM_START + UNK * query_num + IM_END
    if layout.grid:
        cols, rows = layout.grid
        row = (SLICE_START + UNK * query_num + SLICE_END) * cols
        text += "\n".join([row] * rows)
    return text


