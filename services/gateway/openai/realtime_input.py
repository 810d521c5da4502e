"""A realtime connection's input on its way into the live session (`LiveSessions.append`), in arrival order.

Audio (16 kHz float32) goes a whole second at a time, so the muxer never holds a partial second from here and
what has not reached the model is exactly this buffer: `clear` drops it, `seal` sends it (a commit; the partial
second waits in the muxer until Respond flushes it). While the model answers, the buffer is held (the session's
turn state refuses new units then) and `release` sends what turn detection keeps of it. Frames wait for the next
send (a unit carries the latest frame of its second); text goes after the audio before it.

Sends run one after another in one background task; what piles up while one is in flight goes in the next call
(merged as long as order holds), so a slow prefill never reorders nor floods the session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from protos.minicpmo.v1 import omni_pb2
from services.common.audio import SAMPLE_RATE

MAX_MERGED_SAMPLES = 10 * SAMPLE_RATE  # one AppendUnit call stays well under the server's per-call audio limit


class InputSender:
    def __init__(self, append: Callable[[omni_pb2.AppendUnitRequest], Awaitable[Any]],
                 on_error: Callable[[BaseException], None], max_held_s: float):  # fmt: skip
        self._append = append
        self._on_error = on_error
        self._max_held = int(max_held_s * SAMPLE_RATE)
        self._audio = np.zeros(0, np.float32)
        self.start = 0  # position of the buffer's first sample in the connection's 16 kHz stream
        self._frame: bytes | None = None
        self._queue: list[omni_pb2.AppendUnitRequest] = []
        self._task: asyncio.Task | None = None
        self.held = False
        self._closed = False

    @property
    def end(self) -> int:
        """Stream position after the last sample received."""
        return self.start + self._audio.shape[0]

    @property
    def unsent_samples(self) -> int:
        return self._audio.shape[0]

    def add_audio(self, pcm: np.ndarray) -> None:
        self._audio = np.concatenate([self._audio, pcm])
        if self.held:
            self._drop(self._audio.shape[0] - self._max_held)  # bounded while the model answers
        else:
            self._send(whole_seconds=True)

    def add_frame(self, data: bytes) -> None:
        self._frame = data

    def add_text(self, text: str) -> None:
        self._send(whole_seconds=True, text=text)

    def seal(self) -> None:
        """Send everything, the partial second too."""
        self._send(whole_seconds=False)

    def clear(self) -> int:
        """Drop the unsent audio; returns how many samples."""
        dropped = self._audio.shape[0]
        self._drop(dropped)
        return dropped

    def hold(self) -> None:
        self.held = True

    def release(self, keep_from: int | None) -> None:
        """Resume sending, first dropping the held audio before stream position `keep_from` (None: keep all)."""
        if keep_from is not None:
            self._drop(keep_from - self.start)
        self.held = False
        self._send(whole_seconds=True)

    async def drained(self) -> None:
        """Wait until every input received so far is in the session (failures were reported already)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    def close(self) -> None:
        """Send nothing more (the connection is gone)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()

    def _drop(self, n: int) -> None:
        n = min(max(n, 0), self._audio.shape[0])
        self._audio = self._audio[n:]
        self.start += n

    def _send(self, whole_seconds: bool, text: str = "") -> None:
        n = self._audio.shape[0]
        if whole_seconds:
            n -= n % SAMPLE_RATE
        frame_goes = self._frame is not None and (n or text or not whole_seconds)
        if self._closed or not (n or text or frame_goes):
            return
        req = omni_pb2.AppendUnitRequest(text=text)
        if n:
            req.audio.CopyFrom(_audio(self._audio[:n].tobytes()))
            self._drop(n)
        if frame_goes:
            req.frames.add(data=self._frame)
            self._frame = None
        self._queue.append(req)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        while self._queue:
            req = self._queue.pop(0)
            while self._queue and _mergeable(req, self._queue[0]):
                req = _merged(req, self._queue.pop(0))
            try:
                await self._append(req)
            except Exception as e:  # reported to the client; later input still goes in
                self._on_error(e)


def _audio(pcm_f32le: bytes) -> omni_pb2.Audio:
    return omni_pb2.Audio(pcm=pcm_f32le, format=omni_pb2.SAMPLE_FORMAT_FLOAT32, sample_rate=SAMPLE_RATE)


def _mergeable(a: omni_pb2.AppendUnitRequest, b: omni_pb2.AppendUnitRequest) -> bool:
    # AppendUnit pushes frames before audio and prefills text last: merging must not move any of them
    return (
        not a.text
        and not (b.frames and a.audio.pcm)
        and (len(a.audio.pcm) + len(b.audio.pcm)) // 4 <= MAX_MERGED_SAMPLES
    )


def _merged(a: omni_pb2.AppendUnitRequest, b: omni_pb2.AppendUnitRequest) -> omni_pb2.AppendUnitRequest:
    out = omni_pb2.AppendUnitRequest(text=b.text, frames=[*a.frames, *b.frames])
    if a.audio.pcm or b.audio.pcm:
        out.audio.CopyFrom(_audio(a.audio.pcm + b.audio.pcm))
    return out
