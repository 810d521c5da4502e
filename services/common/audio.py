"""Audio as the model takes and makes it: 16 kHz mono input (PCM checks of rate, channels, range), how many
LLM tokens and which placeholder text a clip of a given length becomes (upstream's `get_audio_placeholder`),
and the 24 kHz of the speech it produces.

Pure numpy/soxr, shared by the gateway (which validates audio and builds prompts) and the audio encoder.
"""

from __future__ import annotations

import math

import numpy as np
import soxr

from services.runtime.errors import InvalidArgument

SAMPLE_RATE = 16000  # what Whisper takes
SPEECH_SAMPLE_RATE = 24000  # what the vocoder (Vocos) produces
HOP_LENGTH = 160  # samples per mel frame (100 frames/s)
MAX_AUDIO_SECONDS = 600.0  # default cap on one clip; the LLM context is the real limit (~27 tokens per second)
POOL_STEP = 2  # upstream's get_audio_placeholder hard-codes 2 (config.audio_pool_step is 2 as well)
CHUNK_SECONDS = 1.0  # upstream's chunk_length for chunked placeholders and the block-causal mask
# Rates resampled to 16 kHz (the common hardware/file rates); anything else is refused rather than guessed.
ACCEPTED_SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
MAX_CHANNELS = 8
AUDIO_START = "<|audio_start|>"
AUDIO_END = "<|audio_end|>"
AUDIO_FILLER = "<unk>"  # upstream fills audio placeholders with the unk token, never `<|audio|>`


class AudioInputError(InvalidArgument):
    """Audio that cannot be used as given; the message says what to change."""


def validate_pcm(
    pcm: np.ndarray, sample_rate: int = SAMPLE_RATE, max_seconds: float = MAX_AUDIO_SECONDS
) -> np.ndarray:
    """Check one clip and return it as mono float32 at 16 kHz.

    - dtype: float16/32/64 are taken as samples in [-1, 1]; int16 and int32 PCM are scaled to [-1, 1] as
      soundfile does; anything else (unsigned, bool, complex, object) is refused.
    - range: float audio louder than full scale (peak above 1) is scaled down to a peak of 1 (a clipped or
      wrongly scaled recording still sounds like itself; unbounded values would overflow the features).
    - layout: 1-D mono, or 2-D `(frames, channels)` as soundfile returns it; multi-channel audio is downmixed
      by averaging the channels (what `librosa.load(mono=True)`, the loader upstream's examples use, does).
    - sample rate: one of ACCEPTED_SAMPLE_RATES (8, 11.025, 12, 16, 22.05, 24, 32, 44.1, 48 kHz); other than
      16 kHz is resampled with soxr "HQ" (librosa's default resampler).
    - refused: empty clips, NaN/inf samples, clips longer than `max_seconds`.
    """
    arr = np.asarray(pcm)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise AudioInputError("audio contains NaN or infinite samples")
        peak = float(np.abs(arr).max(initial=0.0))
        arr = (arr / peak if peak > 1.0 else arr).astype(np.float32, copy=False)
    elif arr.dtype.kind == "i" and arr.dtype.itemsize in (2, 4):
        arr = arr.astype(np.float32) / np.float32(np.iinfo(arr.dtype).max + 1)
    else:
        raise AudioInputError(f"audio dtype {arr.dtype} not supported: send float32 samples in [-1, 1] or int16 PCM")
    if arr.ndim == 2:
        frames, channels = arr.shape
        if channels > MAX_CHANNELS:
            hint = " (it looks channels-first: pass pcm.T)" if frames <= MAX_CHANNELS else ""
            raise AudioInputError(f"audio of shape {arr.shape}: expected (frames, channels<={MAX_CHANNELS}){hint}")
        arr = arr.mean(axis=1, dtype=np.float32) if channels > 1 else arr[:, 0]
    elif arr.ndim != 1:
        raise AudioInputError(f"audio of shape {arr.shape}: expected 1-D mono or 2-D (frames, channels)")
    if arr.size == 0:
        raise AudioInputError("audio is empty (0 samples)")
    if sample_rate not in ACCEPTED_SAMPLE_RATES:
        raise AudioInputError(f"sample rate {sample_rate} Hz not supported; use one of {list(ACCEPTED_SAMPLE_RATES)}")
    seconds = arr.size / sample_rate
    if seconds > max_seconds:
        raise AudioInputError(f"audio is {seconds:.1f} s long; the limit is {max_seconds:g} s per clip")
    if sample_rate != SAMPLE_RATE:
        arr = soxr.resample(arr, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(arr)


def join_parts(parts: list[np.ndarray]) -> np.ndarray:
    """Consecutive audio parts of one message become one clip before Whisper (upstream `audio_parts` merge)."""
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def encoder_frames(mel_frames: int) -> int:
    """Whisper frames after conv2 (kernel 3, stride 2, padding 1)."""
    return (mel_frames - 1) // 2 + 1


def pooled_tokens(enc_frames: int, pool_step: int = POOL_STEP) -> int:
    """LLM tokens after AvgPool1d(pool_step): upstream's `(x - step) // step + 1` (0 for a single frame)."""
    return (enc_frames - pool_step) // pool_step + 1


def mel_frames(num_samples: int) -> int:
    return math.ceil(num_samples / HOP_LENGTH)


def audio_token_count(num_samples: int) -> int:
    """LLM tokens for a clip of `num_samples` 16 kHz samples (1 s -> 25; fewer than 321 samples -> 0)."""
    return pooled_tokens(encoder_frames(mel_frames(num_samples)))


def _tokens_per_chunk(chunk_seconds: float = CHUNK_SECONDS) -> int:
    return pooled_tokens(encoder_frames(int(chunk_seconds * 100)))


def audio_placeholder(num_samples: int, chunk_input: bool = True, chunk_seconds: float = CHUNK_SECONDS) -> str:
    """Placeholder text for one audio part: one `<|audio_start|>` + fillers + `<|audio_end|>` group per 1 s chunk
    (the last one shorter) when `chunk_input`, else one group; a clip with 0 tokens gets no chunk groups."""
    n = audio_token_count(num_samples)
    if not chunk_input:
        return AUDIO_START + AUDIO_FILLER * n + AUDIO_END
    per_chunk = _tokens_per_chunk(chunk_seconds)
    sizes = [min(per_chunk, n - start) for start in range(0, n, per_chunk)]
    return "".join(AUDIO_START + AUDIO_FILLER * k + AUDIO_END for k in sizes)


