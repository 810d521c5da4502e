"""Codes -> 24 kHz audio: DVAE (`tts.dvae.`) then Vocos (`assets/Vocos.pt`), offline and streaming.

Streaming follows upstream `_generate_mel_spec_audio_streaming`: each chunk's new codes are decoded together with
the 4 codes before them, and the resulting audio is cross-faded with the previous chunk over 2048 samples
(`_linear_overlap_add2_wav`). Upstream holds back a whole chunk until the next one arrives; here only the last
2048 samples are held (they are the only ones the next cross-fade changes), so each chunk's new audio is emitted
as soon as it is decoded and the concatenated stream is the same. `VocoderStream` is the explicit per-utterance
state; it may live in the TTS replica or in a separate Vocoder deployment (the codes travel with every chunk).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from vocos import Vocos
from vocos.feature_extractors import MelSpectrogramFeatures
from vocos.heads import ISTFTHead
from vocos.models import VocosBackbone

from services.common.checkpoint import CheckpointReader
from services.tts_decoder.dvae import DVAE, load_dvae

SAMPLE_RATE = 24000
HOP_LENGTH = 256
SAMPLES_PER_CODE = 2 * HOP_LENGTH  # one code = 2 mel frames
OVERLAP_CODES = 4
CROSSFADE_SAMPLES = OVERLAP_CODES * SAMPLES_PER_CODE  # 2048
VOCOS_FILE = "assets/Vocos.pt"


def build_vocos() -> Vocos:
    """Vocos with upstream `initialize_vocos` hparams (24 kHz, n_fft 1024, hop 256, 100 mels, 8 layers)."""
    return Vocos(
        MelSpectrogramFeatures(sample_rate=SAMPLE_RATE, n_fft=1024, hop_length=HOP_LENGTH, n_mels=100),
        VocosBackbone(input_channels=100, dim=512, intermediate_dim=1536, num_layers=8),
        ISTFTHead(dim=512, n_fft=1024, hop_length=HOP_LENGTH),
    )


def crossfade_weights(prev_len: int, next_len: int, overlap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's triangular weights over the overlap: (weights of the previous chunk's tail, of the next head)."""
    weight_len = max(prev_len, next_len) + overlap
    t = torch.linspace(0, 1, weight_len + 2, dtype=torch.float32)[1:-1]
    weight = 0.5 - (t - 0.5).abs()
    return weight[weight_len - overlap : weight_len], weight[:overlap]


def crossfade(tail: torch.Tensor, head: torch.Tensor, prev_len: int, next_len: int) -> torch.Tensor:
    """Blend the last `overlap` samples of the previous chunk (whose full length upstream holds is `prev_len`)
    with the first `overlap` samples of the next chunk (length `next_len`), as `_linear_overlap_add2_wav`."""
    w_prev, w_next = crossfade_weights(prev_len, next_len, tail.shape[0])
    return (w_prev * tail + w_next * head) / (w_prev + w_next)


@dataclass
class VocoderStream:
    """Per-utterance streaming vocoder state."""

    history: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4, dtype=torch.long))  # last codes
    tail: torch.Tensor | None = None  # the held last CROSSFADE_SAMPLES of the previous chunk
    prev_len: int = 0  # length of the previous chunk as upstream holds it (its `prev_wav`)


class WaveDecoder:
    """Codes -> audio: DVAE + Vocos, offline (`decode`) and streaming (`push_many` over `VocoderStream`s)."""

    def __init__(self, dvae: DVAE, vocos: Vocos, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.dvae = dvae.to(self.device, dtype).eval()
        self.dvae.vq_layer.float()  # FSQ maths in float32, as vector-quantize-pytorch expects
        # The ISTFT head stays float32 (as upstream's `.float()` Vocos); the backbone runs in the serving dtype.
        self.vocos = vocos.to(self.device).eval()
        self.vocos.backbone.to(dtype)

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> WaveDecoder:
        """Loads `tts.dvae.` of the checkpoint and `assets/Vocos.pt`."""
        path = Path(model_dir) / VOCOS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: Vocos weights not found")
        vocos = build_vocos()
        # Stored parameters are bf16; load_state_dict copies them into the float32 module (upcast), as upstream.
        vocos.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return cls(load_dvae(CheckpointReader(model_dir), device, dtype), vocos, device, dtype)

    @torch.inference_mode()
    def mel(self, codes: torch.Tensor) -> torch.Tensor:
        """(T, 4) or (B, T, 4) codes -> (B, 100, 2T) mel."""
        codes = codes[None] if codes.dim() == 2 else codes
        return self.dvae(codes.to(self.device))

    @torch.inference_mode()
    def mel_to_audio(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, 100, F) mel -> (B, F*256) float32 audio (Vocos backbone + ISTFT head)."""
        x = self.vocos.backbone(mel.to(self.device, self.vocos.backbone.embed.weight.dtype))
        return self.vocos.head(x.float()).float()

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """(T, 4) codes -> float32 mono audio at 24 kHz (offline, one pass)."""
        return self.mel_to_audio(self.mel(codes))[0].cpu().numpy()

    def new_stream(self) -> VocoderStream:
        return VocoderStream()

    def push(self, stream: VocoderStream, codes: torch.Tensor, flush: bool = False) -> np.ndarray:
        """Decode one chunk's new codes (n, 4) and return the audio that is final now (see module doc)."""
        return self.push_many([stream], [codes], [flush])[0]

    def push_many(self, streams: list[VocoderStream], codes: list[torch.Tensor], flush: list[bool]) -> list[np.ndarray]:
        """`push` for several utterances; chunks of equal length are decoded in one batch (no padding, which
        would change the convolutions at the edges)."""
        windows = [torch.cat([s.history, c.cpu().long()]) for s, c in zip(streams, codes)]
        wavs: list[torch.Tensor | None] = [None] * len(streams)
        by_len: dict[int, list[int]] = {}
        for i, (w, c) in enumerate(zip(windows, codes)):
            if c.shape[0] > 0:
                by_len.setdefault(w.shape[0], []).append(i)
        for idxs in by_len.values():
            audio = self.mel_to_audio(self.mel(torch.stack([windows[i] for i in idxs]))).cpu()
            for i, a in zip(idxs, audio):
                wavs[i] = a
        out = []
        for s, w, c, wav, fl in zip(streams, windows, codes, wavs, flush):
            s.history = w[-OVERLAP_CODES:]
            out.append(_emit(s, wav, fl).numpy())
        return out


def _emit(s: VocoderStream, wav: torch.Tensor | None, flush: bool) -> torch.Tensor:
    """Cross-fade `wav` onto the held tail, hold the new tail back (unless flushing), return what is final."""
    parts: list[torch.Tensor] = []
    if wav is not None:
        if s.tail is None:  # first chunk of a segment: nothing to blend with
            body = wav
        else:
            n = s.tail.shape[0]
            parts.append(crossfade(s.tail, wav[:n], s.prev_len, wav.shape[0]))
            body = wav[n:]
        s.prev_len = body.shape[0]
        keep = min(CROSSFADE_SAMPLES, body.shape[0])
        parts.append(body[: body.shape[0] - keep])
        s.tail = body[body.shape[0] - keep :]
    if flush and s.tail is not None:
        # End of a segment: upstream yields the last chunk without smoothing; the next segment starts fresh.
        parts.append(s.tail)
        s.tail, s.prev_len = None, 0
    return torch.cat(parts) if parts else torch.zeros(0)
