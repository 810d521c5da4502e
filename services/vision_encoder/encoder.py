"""`ImageEmbedder`: images in, per-image slice layout + `query_num` LLM-width embeddings per slice out.

Slices of all images in a call run through the model together, `batch_size` at a time (upstream runs `vpm` in
batches of `vision_batch_size`), each batch zero-padded to its longest slice. Results per slice do not depend on
what else is in the batch beyond float rounding: padding is masked out of every attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from services.common.config import ModelConfig
from services.vision_encoder.model import VisionModel, load_vision_model
from services.common.image_layout import DEFAULT_MAX_PIXELS, ImageProcessorConfig, SliceLayout, image_placeholder
from services.vision_encoder.processor import PreprocessedImage, load_image, preprocess


@dataclass
class EncodedImage:
    layout: SliceLayout
    embeddings: torch.Tensor  # (n_slices * query_num, llm_hidden), on the CPU, in the model's dtype

    def placeholder(self, image_idx: int, use_image_id: bool) -> str:
        """The prompt text these embeddings fill (upstream `get_slice_image_placeholder`)."""
        query_num = self.embeddings.shape[0] // self.layout.n_slices
        return image_placeholder(self.layout, image_idx, use_image_id, query_num)


def collate_slices(
    pixels: list[np.ndarray], tgt_sizes: list[np.ndarray] | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 slices (3, patch, L_i) -> zero-padded (B, 3, patch, max L_i) and (B, 2) int64 tgt_sizes."""
    length = max(p.shape[-1] for p in pixels)
    batch = np.zeros((len(pixels), *pixels[0].shape[:-1], length), dtype=np.float32)
    for i, p in enumerate(pixels):
        batch[i, ..., : p.shape[-1]] = p
    return torch.from_numpy(batch), torch.from_numpy(np.asarray(np.vstack(tgt_sizes), dtype=np.int64))


class ImageEmbedder:
    """SigLIP + resampler + the image processor settings: encoded images in, LLM-width embeddings out."""

    def __init__(self, model: VisionModel, processor_cfg: ImageProcessorConfig, batch_size: int):
        """`batch_size`: slices per forward (upstream `vision_batch_size`, 16)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.processor_cfg = processor_cfg
        self.batch_size = batch_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @classmethod
    def from_checkpoint(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        attn_implementation: str = "sdpa",
        progress: bool = False,
    ) -> ImageEmbedder:
        """Loads `vpm.` + `resampler.` only; `batch_size` None takes `vision_batch_size` from config.json."""
        model = load_vision_model(model_dir, device, dtype, attn_implementation, progress)
        processor_cfg = ImageProcessorConfig.from_model_dir(model_dir, max_pixels=max_pixels)
        return cls(model, processor_cfg, batch_size or ModelConfig.from_model_dir(model_dir).vision_batch_size)

    def preprocess(
        self, images: list[Image.Image | bytes], max_slice_nums: int | None = None
    ) -> list[PreprocessedImage]:
        """Decode, check and slice every image first, so one bad image fails the call before any compute."""
        cfg = self.processor_cfg
        return [preprocess(load_image(im, cfg.max_pixels), max_slice_nums, cfg) for im in images]

    def encode(self, images: list[Image.Image | bytes], max_slice_nums: int | None = None) -> list[EncodedImage]:
        return self.encode_preprocessed(self.preprocess(images, max_slice_nums))

    @torch.inference_mode()
    def encode_preprocessed(self, images: list[PreprocessedImage]) -> list[EncodedImage]:
        pixels = [p for im in images for p in im.pixel_values()]
        tgt_sizes = [t for im in images for t in im.tgt_sizes]
        outputs = []
        for start in range(0, len(pixels), self.batch_size):
            batch = slice(start, start + self.batch_size)
            pixel_values, tgt = collate_slices(pixels[batch], tgt_sizes[batch])
            out = self.model(pixel_values.to(self.device, self.dtype), tgt.to(self.device))
            outputs.append(out.cpu())
        per_slice = torch.cat(outputs).flatten(0, 1) if outputs else torch.empty(0)
        query_num = self.processor_cfg.query_num
        result, offset = [], 0
        for im in images:
            n = im.layout.n_slices * query_num
            result.append(EncodedImage(im.layout, per_slice[offset : offset + n]))
            offset += n
        return result
