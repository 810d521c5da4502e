"""Time-division multiplexing of a live session's audio and video into 1-second units.

Pure logic (numpy only, no I/O, no torch) so the gateway can run it cheaply per session.

Upstream lays out omni input one unit per second: ``["<unit>", frame, audio[16000*i : 16000*(i+1)]]`` where the
frame is the one taken at the end of that second (``frame_at_(i+1)s``). Clients here push audio chunks of ANY
length and frames at ANY rate; the muxer re-cuts them into those units and hands each one out the moment its
second of audio is complete, so the encoders can start on it while the user is still talking. A frame belongs to
the unit being filled when it arrives; a unit carries the latest frame that arrived during it.

``TDMMuxer(samples_per_unit=16000, first_seq=0)``: ``push_audio(pcm) -> list[Unit]`` (mono float32 16 kHz, any
length; the units it completed, in order), ``push_frame(frame)``, ``flush() -> list[Unit]`` (on Respond: the
partial last second, if anything is pending), ``pending_samples``, ``pending_audio()``, ``pending_frame``,
``next_seq``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from services.runtime.errors import InvalidArgument


class TDMInputError(InvalidArgument):
    """A live-session input the muxer cannot place; the message says what to change."""


@dataclass(frozen=True, eq=False)  # eq on numpy arrays is ambiguous; units are identified by seq
class Unit:
    seq: int
    audio: np.ndarray  # float32 (n,), 16 kHz
    frame: Any | None
    partial: bool = False


class TDMMuxer:
    def __init__(self, samples_per_unit: int = 16000, first_seq: int = 0) -> None:
        if samples_per_unit <= 0:
            raise TDMInputError(f"samples_per_unit must be positive, got {samples_per_unit}")
        self.samples_per_unit = samples_per_unit
        self._next_seq = first_seq
        self._chunks: list[np.ndarray] = []  # audio of the open unit, not yet concatenated
        self._pending = 0  # samples in _chunks
        self.pending_frame: Any | None = None  # latest frame for the open unit

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def pending_samples(self) -> int:
        return self._pending

    def pending_audio(self) -> np.ndarray:
        """The open unit's audio so far (what must survive this process to continue the session elsewhere)."""
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.float32)

    def push_audio(self, pcm: np.ndarray) -> list[Unit]:
        pcm = np.asarray(pcm)
        if pcm.ndim != 1 or pcm.dtype != np.float32:
            raise TDMInputError(f"audio chunk must be 1-D float32 PCM, got {pcm.dtype} of shape {pcm.shape}")
        units: list[Unit] = []
        offset = 0
        while offset < pcm.shape[0]:
            take = min(self.samples_per_unit - self._pending, pcm.shape[0] - offset)
            self._chunks.append(pcm[offset : offset + take])
            self._pending += take
            offset += take
            if self._pending == self.samples_per_unit:
                units.append(self._emit(partial=False))
        return units

    def push_frame(self, frame: Any) -> None:
        if frame is None:
            raise TDMInputError("frame is empty")
        self.pending_frame = frame

    def flush(self) -> list[Unit]:
        if self._pending == 0 and self.pending_frame is None:
            return []
        return [self._emit(partial=True)]

    def _emit(self, partial: bool) -> Unit:
        unit = Unit(seq=self._next_seq, audio=self.pending_audio(), frame=self.pending_frame, partial=partial)
        self._next_seq += 1
        self._chunks, self._pending, self.pending_frame = [], 0, None
        return unit
