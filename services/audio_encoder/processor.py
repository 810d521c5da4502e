"""Whisper log-mel features as upstream's MiniCPMOProcessor computes them (transformers' WhisperFeatureExtractor).

PCM checks and token counts live in `services.common.audio`. Everything here is per clip: a "clip" is what
one message's consecutive audio parts become after `join_parts` (upstream merges them with `np.hstack` before
Whisper, while placeholders stay per part).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from services.common.audio import SAMPLE_RATE, AudioInputError

PIECE_SECONDS = 30  # Whisper's window: longer clips are cut into 30 s pieces, as upstream does
PIECE_SAMPLES = PIECE_SECONDS * SAMPLE_RATE


def split_pieces(clip: np.ndarray) -> list[np.ndarray]:
    """Cut a clip into <= 30 s pieces (upstream feeds each piece to Whisper separately)."""
    return [clip[i : i + PIECE_SAMPLES] for i in range(0, len(clip), PIECE_SAMPLES)]


@dataclass(frozen=True)
class AudioFeatures:
    """Log-mel features of a batch of <= 30 s pieces, zero-padded to the longest."""

    features: torch.Tensor  # (B, n_mels, T) float32
    lengths: torch.Tensor  # (B,) int64 true mel frames per piece


def load_feature_extractor(model_dir: str | Path) -> WhisperFeatureExtractor:
    """WhisperFeatureExtractor from the checkpoint's preprocessor_config.json (only the Whisper fields are read;
    the file also holds the image processor's settings)."""
    path = Path(model_dir) / "preprocessor_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no preprocessor_config.json in the model directory")
    cfg = json.loads(path.read_text())
    keys = ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft", "padding_value")
    return WhisperFeatureExtractor(**{k: cfg[k] for k in keys if k in cfg})


def feature_window(extractor: WhisperFeatureExtractor, longest: int) -> int:
    """Samples of zero-padded window that give the same frames as upstream's 30 s window.

    Upstream pads every piece with zeros to 30 s. Frame k covers samples [k*hop - n_fft/2, k*hop + n_fft/2), and
    only frames near the window's end see its reflect padding. A window of `longest + 2*n_fft` samples keeps every
    frame that touches the audio, plus one all-silent frame (upstream's max normalisation sees those), clear of
    that end, so the kept frames and the normalisation are the same while a 1 s chunk costs ~1.1 s of STFT
    instead of 30 s.
    """
    hop = extractor.hop_length
    return min(extractor.n_samples, math.ceil((longest + 2 * extractor.n_fft) / hop) * hop)


def extract_features(extractor: WhisperFeatureExtractor, pieces: list[np.ndarray]) -> AudioFeatures:
    """Upstream `audio_feature_extract` on pieces already <= 30 s: log-mel with `padding="max_length"` (over
    `feature_window`), trimmed to each true length, then zero-padded to the batch maximum."""
    if any(len(p) > extractor.n_samples for p in pieces):
        raise AudioInputError(f"a feature piece is longer than {PIECE_SECONDS} s; cut clips with split_pieces first")
    out = extractor(
        pieces,
        sampling_rate=SAMPLE_RATE,
        return_attention_mask=True,
        padding="max_length",
        max_length=feature_window(extractor, max(len(p) for p in pieces)),
        return_tensors="pt",
    )
    lengths = out["attention_mask"].sum(dim=1).to(torch.int64)
    features = out["input_features"][:, :, : int(lengths.max())].contiguous()
    frame = torch.arange(features.shape[-1])
    features = features.masked_fill(frame[None, None, :] >= lengths[:, None, None], 0.0)
    return AudioFeatures(features=features, lengths=lengths)
