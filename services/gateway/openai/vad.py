"""Server-side turn detection (the Realtime API's `server_vad`): where the user's speech starts and stops in a
16 kHz mono stream, with the silero-vad model that the `silero-vad` package ships (loaded from the package,
never from the network).

``TurnDetector(settings)``: ``push(pcm) -> list[SpeechStarted | SpeechStopped]`` for any chunk length;
``speaking``; ``samples`` (audio seen so far). Positions are milliseconds of the stream, as the Realtime API
reports them: ``SpeechStarted.audio_start_ms`` is where speech began minus ``prefix_padding_ms`` (the audio kept
before it); ``SpeechStopped.audio_end_ms`` is where the silence reached ``silence_duration_ms`` (the end of the
audio that the turn is made of).

The model runs on 32 ms windows (512 samples) and keeps a recurrent state, so each detector has its own copy of
the model (a deep copy of one loaded per process: ~10 ms instead of ~50-100 ms). It runs without TorchScript's
optimizing executor: that one profiles every new copy over its first ~100 windows at ~30-50 ms of CPU each
(a new connection would lag seconds behind), while the plain interpreter takes ~0.35 ms of CPU per window from
the first one (one intra-op thread), with the same probabilities. Speech starts at a window whose probability
reaches `threshold`; it stops after `silence_duration_ms` of windows below `threshold - 0.15` (silero-vad's
`VADIterator` hysteresis, which runs the windows here).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import numpy as np
import torch

from services.runtime.errors import InvalidArgument

SAMPLE_RATE = 16000
WINDOW = 512  # samples per model call at 16 kHz (silero-vad's fixed window)
HYSTERESIS = 0.15  # VADIterator ends speech below threshold - 0.15


class VadSettingsError(InvalidArgument):
    """Turn-detection settings out of range; the message names the field."""


@dataclass(frozen=True)
class VadSettings:
    """The Realtime API's `server_vad` knobs, with its defaults."""

    threshold: float = 0.5
    silence_duration_ms: int = 500
    prefix_padding_ms: int = 300

    def __post_init__(self) -> None:
        if not HYSTERESIS < self.threshold < 1.0:
            raise VadSettingsError(
                f"threshold must be in ({HYSTERESIS}, 1), got {self.threshold}: speech ends below threshold - "
                f"{HYSTERESIS}"
            )
        if not 0 < self.silence_duration_ms <= 10_000:
            raise VadSettingsError(f"silence_duration_ms must be in 1..10000, got {self.silence_duration_ms}")
        if not 0 <= self.prefix_padding_ms <= 10_000:
            raise VadSettingsError(f"prefix_padding_ms must be in 0..10000, got {self.prefix_padding_ms}")


@dataclass(frozen=True)
class SpeechStarted:
    audio_start_ms: int


@dataclass(frozen=True)
class SpeechStopped:
    audio_end_ms: int


@functools.cache
def packaged_model() -> torch.jit.ScriptModule:
    """The model the package ships (loaded once per process; detectors run copies)."""
    threads = torch.get_num_threads()
    from silero_vad import load_silero_vad  # importing it sets torch's thread count to 1 for the whole process

    torch.set_num_threads(threads)
    return load_silero_vad(onnx=False)


class TurnDetector:
    def __init__(self, settings: VadSettings):
        from silero_vad import VADIterator

        self.settings = settings
        self._windows = VADIterator(
            copy.deepcopy(packaged_model()),
            threshold=settings.threshold,
            sampling_rate=SAMPLE_RATE,
            min_silence_duration_ms=settings.silence_duration_ms,
            speech_pad_ms=0,  # padding is reported in the events' positions instead of moving them
        )
        self._rest = np.zeros(0, np.float32)  # samples waiting for a whole window
        self._samples = 0  # samples run through the model

    @property
    def speaking(self) -> bool:
        return self._windows.triggered

    @property
    def samples(self) -> int:
        return self._samples + self._rest.shape[0]

    @torch.inference_mode()
    @torch.jit.optimized_execution(False)  # thread-local: see the module doc
    def push(self, pcm: np.ndarray) -> list[SpeechStarted | SpeechStopped]:
        """Run `pcm` (float32 16 kHz mono, any length) and return the turn events it completes, in order."""
        audio = np.concatenate([self._rest, np.asarray(pcm, np.float32)])
        whole = audio.shape[0] - audio.shape[0] % WINDOW
        self._rest = audio[whole:]
        events: list[SpeechStarted | SpeechStopped] = []
        for start in range(0, whole, WINDOW):
            self._samples += WINDOW
            found = self._windows(torch.from_numpy(audio[start : start + WINDOW]))
            if not found:
                continue
            if "start" in found:
                padded = max(0, found["start"] - self.settings.prefix_padding_ms * SAMPLE_RATE // 1000)
                events.append(SpeechStarted(padded * 1000 // SAMPLE_RATE))
            else:
                events.append(SpeechStopped(self._samples * 1000 // SAMPLE_RATE))
        return events
