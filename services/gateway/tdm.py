"""Time-division multiplexing of a live session's audio and video into 1-second units.

Pure logic (numpy only, no I/O, no torch) so the gateway can run it cheaply per session.

Upstream lays out omni input one unit per second: ``["<unit>", frame, audio[16000*i : 16000*(i+1)]]`` where the
frame is the one taken at the end of that second (``frame_at_(i+1)s``). Clients here push audio chunks of ANY
length and frames at ANY rate; the muxer re-cuts them into those units and hands each one out the moment its
second of audio is complete, so the encoders can start on it while the user is still talking.

Public API
----------
``TDMMuxer(sample_rate=16000, unit_seconds=1.0, max_frame_lead_s=10.0, max_pending_frames=64, first_seq=0)``
    ``push_audio(pcm) -> list[Unit]``: append mono PCM (1-D, any length, float32 in [-1, 1]; validate/resample it
    first with the audio encoder's ``validate_pcm``). Audio is one contiguous stream: chunk k follows chunk k-1.
    Returns every unit this chunk completed (zero, one or several), in order.
    ``push_frame(frame, timestamp_s=None) -> list[Unit]``: register a video frame (opaque to the muxer: bytes,
    PIL image, ...). With ``timestamp_s`` (seconds on the audio's clock: 0.0 = first audio sample) the frame
    belongs to the unit whose window ``(start, end]`` holds it (the first unit also takes t == 0), so a frame at
    exactly 1.0 s is unit 0's frame, as upstream's ``frame_at_(i+1)s``. Without a timestamp it belongs to the unit
    being filled now (arrival order). A unit gets the LATEST frame of its window; earlier ones are dropped
    (``stats.superseded_frames``). A timestamped frame for a unit already emitted is dropped
    (``stats.late_frames``) rather than reordering audio that is already being encoded. Always returns ``[]``
    (a frame never completes a unit; it is a list so both push methods compose the same way).
    ``flush() -> list[Unit]``: on Respond: emit the partial last second (fewer than ``samples_per_unit`` samples,
    ``Unit.partial`` True) if any audio or frame is pending; the next unit starts at the flush point.
    ``pending_samples``, ``next_seq``, ``audio_seconds``, ``stats``.
``Unit(seq, start_s, audio: np.ndarray float32 (n,), frame | None, frame_timestamp_s | None, partial: bool)``:
    ``seq`` numbers units 0, 1, 2, ... (from ``first_seq``) in time order; ``Unit.parts()`` gives the upstream
    content order ``["<unit>", frame?, audio?]``.
``UnitReorderBuffer(first_seq=0, capacity=256)``: the encoders may answer out of order; ``put(seq, item)``
    returns the ``(seq, item)`` pairs that are now releasable strictly in sequence (each exactly once).
    ``next_seq``, ``pending``. ``skip(seq)`` releases the order past a unit that failed (so later ones flow).
``TDMInputError(ValueError)``: bad pushes (2-D audio, NaN, frame too far ahead, too many pending frames, a
    sequence number already released or duplicated); the gateway maps it to INVALID_ARGUMENT.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import numpy as np

UNIT_TOKEN = "<unit>"


class TDMInputError(ValueError):
    """A live-session input the muxer cannot place; the message says what to change."""


@dataclass(frozen=True, eq=False)  # eq on numpy arrays is ambiguous; units are identified by seq
class Unit:
    seq: int
    start_s: float
    audio: np.ndarray
    frame: Any | None
    frame_timestamp_s: float | None
    partial: bool = False
    sample_rate: int = 16000

    @property
    def duration_s(self) -> float:
        return self.audio.shape[0] / self.sample_rate

    def parts(self) -> list[Any]:
        """Content pieces in upstream's order: ``<unit>``, then the frame, then the audio (absent parts left out)."""
        pieces: list[Any] = [UNIT_TOKEN]
        if self.frame is not None:
            pieces.append(self.frame)
        if self.audio.shape[0] > 0:
            pieces.append(self.audio)
        return pieces


@dataclass
class MuxStats:
    units: int = 0
    frames: int = 0
    late_frames: int = 0
    superseded_frames: int = 0


@dataclass(order=True)
class _PendingFrame:
    timestamp_s: float
    arrival: int
    frame: Any = field(compare=False)


class TDMMuxer:
    def __init__(
        self,
        sample_rate: int = 16000,
        unit_seconds: float = 1.0,
        max_frame_lead_s: float = 10.0,
        max_pending_frames: int = 64,
        first_seq: int = 0,
    ) -> None:
        if sample_rate != 16000:
            raise TDMInputError(f"units carry 16 kHz audio; got sample_rate={sample_rate} (resample first)")
        self.sample_rate = sample_rate
        self.samples_per_unit = round(sample_rate * unit_seconds)
        if self.samples_per_unit <= 0:
            raise TDMInputError(f"unit_seconds must be positive, got {unit_seconds}")
        self.max_frame_lead_s = max_frame_lead_s
        self.max_pending_frames = max_pending_frames
        self.stats = MuxStats()
        self._next_seq = first_seq
        self._chunks: list[np.ndarray] = []  # audio of the open unit, not yet concatenated
        self._pending = 0  # samples in _chunks
        self._unit_start = 0  # absolute sample index where the open unit starts
        self._timed_frames: list[_PendingFrame] = []  # sorted by (timestamp, arrival)
        self._open_frame: Any | None = None  # latest arrival-order (untimed) frame for the open unit
        self._arrivals = 0

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def pending_samples(self) -> int:
        return self._pending

    @property
    def audio_seconds(self) -> float:
        """Audio received so far, in seconds (the muxer's clock)."""
        return (self._unit_start + self._pending) / self.sample_rate

    def push_audio(self, pcm: np.ndarray) -> list[Unit]:
        pcm = np.asarray(pcm)
        if pcm.ndim != 1:
            raise TDMInputError(f"audio chunk must be 1-D mono PCM, got shape {pcm.shape}")
        if pcm.dtype.kind != "f":
            raise TDMInputError(f"audio chunk must be float PCM in [-1, 1], got dtype {pcm.dtype}")
        pcm = pcm.astype(np.float32, copy=False)
        if not np.isfinite(pcm).all():
            raise TDMInputError("audio chunk contains NaN or infinite samples")
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

    def push_frame(self, frame: Any, timestamp_s: float | None = None) -> list[Unit]:
        if frame is None:
            raise TDMInputError("frame is empty")
        self.stats.frames += 1
        self._arrivals += 1
        if timestamp_s is None:
            if self._open_frame is not None:
                self.stats.superseded_frames += 1
            self._open_frame = frame
            return []
        timestamp_s = float(timestamp_s)
        if not np.isfinite(timestamp_s) or timestamp_s < 0:
            raise TDMInputError(f"frame timestamp must be a finite number of seconds >= 0, got {timestamp_s}")
        open_start_s = self._unit_start / self.sample_rate
        if self._unit_start > 0 and timestamp_s <= open_start_s:
            self.stats.late_frames += 1
            return []
        if timestamp_s > self.audio_seconds + self.max_frame_lead_s:
            raise TDMInputError(
                f"frame at {timestamp_s:.3f}s is more than {self.max_frame_lead_s}s ahead of the audio "
                f"({self.audio_seconds:.3f}s received); send audio and frames on the same clock"
            )
        if len(self._timed_frames) >= self.max_pending_frames:
            raise TDMInputError(
                f"more than {self.max_pending_frames} frames wait for audio; send the audio of those seconds first"
            )
        bisect.insort(self._timed_frames, _PendingFrame(timestamp_s, self._arrivals, frame))
        return []

    def flush(self) -> list[Unit]:
        if self._pending == 0 and self._open_frame is None and not self._frames_due():
            return []
        return [self._emit(partial=True)]

    def _frames_due(self) -> bool:
        end_s = (self._unit_start + self.samples_per_unit) / self.sample_rate
        return bool(self._timed_frames) and self._timed_frames[0].timestamp_s <= end_s

    def _take_frame(self) -> tuple[Any, float | None] | None:
        """The open unit's frame and its timestamp; every other frame of its window is dropped.

        A timestamped frame wins over an untimed one (it says where it belongs); among timestamped frames the
        latest timestamp wins (ties: the later arrival)."""
        end_s = (self._unit_start + self.samples_per_unit) / self.sample_rate
        cut = bisect.bisect_right([f.timestamp_s for f in self._timed_frames], end_s)
        timed = self._timed_frames[:cut]
        del self._timed_frames[:cut]
        untimed, self._open_frame = self._open_frame, None
        candidates = len(timed) + (untimed is not None)
        if candidates == 0:
            return None
        self.stats.superseded_frames += candidates - 1
        if timed:
            latest = max(timed)  # ordered by (timestamp, arrival)
            return latest.frame, latest.timestamp_s
        return untimed, None

    def _emit(self, partial: bool) -> Unit:
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.float32)
        frame, frame_ts = self._take_frame() or (None, None)
        unit = Unit(
            seq=self._next_seq,
            start_s=self._unit_start / self.sample_rate,
            audio=audio,
            frame=frame,
            frame_timestamp_s=frame_ts,
            partial=partial,
            sample_rate=self.sample_rate,
        )
        self._next_seq += 1
        self._unit_start += self._pending
        self._chunks = []
        self._pending = 0
        self.stats.units += 1
        return unit


class UnitReorderBuffer:
    """Releases results strictly in sequence order however they arrive."""

    def __init__(self, first_seq: int = 0, capacity: int = 256) -> None:
        self._next = first_seq
        self._capacity = capacity
        self._held: dict[int, Any] = {}

    @property
    def next_seq(self) -> int:
        return self._next

    @property
    def pending(self) -> int:
        return len(self._held)

    def put(self, seq: int, item: Any) -> list[tuple[int, Any]]:
        if seq < self._next or seq in self._held:
            raise TDMInputError(f"unit {seq} was already delivered (next expected is {self._next})")
        if seq - self._next >= self._capacity:
            raise TDMInputError(
                f"unit {seq} is {seq - self._next} units ahead of unit {self._next}; at most {self._capacity} may wait"
            )
        self._held[seq] = item
        return self._release()

    def skip(self, seq: int) -> list[tuple[int, Any]]:
        """Give up on unit ``seq`` (its encode failed) so the units after it are not held forever."""
        if seq < self._next or seq in self._held:
            raise TDMInputError(f"unit {seq} was already delivered or is held (next expected is {self._next})")
        self._held[seq] = _SKIPPED
        return self._release()

    def _release(self) -> list[tuple[int, Any]]:
        ready: list[tuple[int, Any]] = []
        while self._next in self._held:
            item = self._held.pop(self._next)
            if item is not _SKIPPED:
                ready.append((self._next, item))
            self._next += 1
        return ready


_SKIPPED = object()
