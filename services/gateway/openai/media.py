"""Media as the OpenAI APIs carry it (base64 strings, data URLs, WAV files, 24 kHz pcm16) <-> the public API's
messages and arrays. Nothing is ever fetched: an image must come inline as a data URL.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import soundfile as sf

from protos.minicpmo.v1 import omni_pb2
from services.gateway.requests import InvalidRequest

PCM16_RATE = 24000  # OpenAI's pcm16: 24 kHz mono little-endian int16


class InvalidParam(InvalidRequest):
    """A malformed request field; `param` names it as OpenAI's error shape does (dotted path)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def b64decode(data: str, param: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParam(f"{param} is not valid base64", param) from None


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_url_bytes(url: str, param: str) -> bytes:
    """The bytes of a `data:<type>;base64,<data>` URL (the only image URL this server takes)."""
    if not url.startswith("data:"):
        raise InvalidParam(
            f"{param} must be a data URL (data:image/png;base64,...): this server fetches nothing from the network",
            param,
        )
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise InvalidParam(f"{param} must be a base64 data URL (data:<mime type>;base64,<data>)", param)
    return b64decode(payload, param)


def input_audio(data: str, fmt: str, param: str) -> omni_pb2.Audio:
    """OpenAI `input_audio` ({data: base64, format}) -> public Audio: a WAV file (any rate the pipeline takes,
    channels averaged) or raw pcm16 at 24 kHz mono."""
    if fmt == "pcm16":
        pcm = pcm16_bytes(data, f"{param}.data")
        return omni_pb2.Audio(pcm=pcm, format=omni_pb2.SAMPLE_FORMAT_INT16, sample_rate=PCM16_RATE)
    try:  # "wav" (the request models admit no other format)
        samples, rate = sf.read(io.BytesIO(b64decode(data, f"{param}.data")), dtype="float32", always_2d=True)
    except RuntimeError as e:  # soundfile.LibsndfileError: not a WAV soundfile can read
        why = getattr(e, "error_string", str(e))
        raise InvalidParam(f"{param}.data is not a readable WAV file ({why})", f"{param}.data") from None
    mono = samples.mean(axis=1, dtype=np.float32)
    return omni_pb2.Audio(pcm=mono.astype("<f4").tobytes(), format=omni_pb2.SAMPLE_FORMAT_FLOAT32, sample_rate=rate)


def pcm16_from_float(pcm_f32le: bytes) -> bytes:
    """The answer's float32 little-endian samples as int16 little-endian (clipped to full scale)."""
    samples = np.frombuffer(pcm_f32le, dtype="<f4")
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def pcm16_bytes(data: str, param: str) -> bytes:
    """Base64 pcm16 (int16 little-endian), decoded and checked."""
    raw = b64decode(data, param)
    if len(raw) % 2:
        raise InvalidParam(f"{param}: pcm16 needs whole 2-byte samples, got {len(raw)} bytes", param)
    return raw


def pcm16_samples(data: str, param: str) -> np.ndarray:
    """Base64 pcm16 -> float32 samples in [-1, 1)."""
    return np.frombuffer(pcm16_bytes(data, param), dtype="<i2").astype(np.float32) / 32768.0


def wav_file(pcm16: bytes, rate: int = PCM16_RATE) -> bytes:
    out = io.BytesIO()
    sf.write(out, np.frombuffer(pcm16, dtype="<i2"), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()
