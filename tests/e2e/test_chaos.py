"""Faults under load: replica processes killed (kill -9) while live sessions speak and answer, and Redis
restarted. No session is stranded, every failure a client sees is a retryable status that arrives quickly, and
every session goes on with its context."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest

from services.client.sdk import MiniCPMOClient, generation_options, retryable
from tests.e2e.media import image_bytes, wav
from tests.replicas import kill_all, wait_for_replacement

pytestmark = [pytest.mark.ray, pytest.mark.redis, pytest.mark.slow]

CHUNK = 3200  # 200 ms


def speech(n: int):
    return generation_options(max_new_tokens=n, min_new_tokens=n, greedy=True, speech=True, speech_greedy=True)


def test_gateway_killed_mid_answer_is_retryable_and_the_session_answers_again(served, golden):
    with MiniCPMOClient(served.target, api_key=served.keys[0]) as client:
        sid = client.create_session().session_id
        pcm = wav(golden, "unit_audio_2s.wav")
        client.append(sid, audio=pcm[:24000])  # one unit and half a second waiting for its rest
        before = client.get_session(sid)
        assert (before.units, before.pending_audio_ms) == (1, 500)
        stream = client.respond_stream(sid, speech(200))
        assert next(stream) is not None  # the answer is under way
        killed = kill_all("Gateway")
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
        assert retryable(err.value), (err.value.code(), err.value.details())
        wait_for_replacement("Gateway", killed)
        started = time.monotonic()
        answer = client.respond(sid, generation_options(max_new_tokens=4, greedy=True))
        assert time.monotonic() - started < 10 and answer.final.usage.completion_tokens >= 1
        after = client.get_session(sid)
        # the unfinished half second was kept with the session and went into the answer's turn
        assert after.units == 2 and after.pending_audio_ms == 0 and after.token_count > before.token_count
        client.close_session(sid)


def test_tts_killed_mid_answer_fails_fast_and_the_session_goes_on(served, golden):
    with MiniCPMOClient(served.target, api_key=served.keys[0]) as client:
        sid = client.create_session().session_id
        client.append(sid, audio=wav(golden, "unit_audio_2s.wav"))
        stream = client.respond_stream(sid, speech(300))
        for event in stream:
            if event.HasField("audio"):
                break  # the answer speaks
        killed = kill_all("TTSDecoder")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert time.monotonic() - started < 5
        wait_for_replacement("TTSDecoder", killed)
        assert client.respond(sid, speech(12)).audio.size > 0
        client.close_session(sid)


@dataclass
class Session:
    """One live session driven in a thread: 200 ms audio pieces, a frame each second, a spoken answer every
    three units; every failure is recorded with when its call started and ended (time.monotonic()), and
    every unit and answer with when it ended, notifying `progress`."""

    sid: str
    progress: threading.Condition
    tokens: list[int] = field(default_factory=list)
    failures: list[tuple[str, float, float]] = field(default_factory=list)
    unit_times: list[float] = field(default_factory=list)  # when each append that prefilled units returned
    answer_times: list[float] = field(default_factory=list)

    def since(self, t: float) -> tuple[int, int]:
        """Units prefilled and answers given after `t`."""
        return sum(u > t for u in self.unit_times), sum(a > t for a in self.answer_times)

    def went_on(self, t: float) -> bool:
        units, answers = self.since(t)
        return units >= 2 and answers >= 1


def drive(client, s: Session, pcm: np.ndarray, frames: list[bytes], stop: threading.Event) -> None:
    k = unanswered = 0  # units since the last answer (a failed append shifts where units end: count them)
    while not stop.is_set():
        piece = pcm[(k * CHUNK) % (len(pcm) - CHUNK) :][:CHUNK]
        frame = [frames[(k // 5) % len(frames)]] if k % 5 == 0 else []
        started = time.monotonic()
        try:
            reply = client.append(s.sid, audio=piece, frames=frame)
            with s.progress:
                s.tokens.append(reply.token_count)
                s.unit_times += [time.monotonic()] * reply.units_prefilled
                s.progress.notify_all()
            unanswered += reply.units_prefilled
            if unanswered >= 3:
                unanswered, started = 0, time.monotonic()
                client.respond(s.sid, speech(8))
                with s.progress:
                    s.answer_times.append(time.monotonic())
                    s.progress.notify_all()
        except grpc.RpcError as e:
            s.failures.append((e.code().name if retryable(e) else f"{e.code().name}: {e.details()}",
                               started, time.monotonic()))  # fmt: skip
        k += 1


def test_chaos_keeps_every_session(served, golden):
    pcm = wav(golden, "unit_audio_2s.wav")
    frames = [image_bytes(golden, "image_unit0.png"), image_bytes(golden, "image_unit1.png")]
    clients = [MiniCPMOClient(served.target, api_key=served.keys[0]) for _ in range(3)]
    progress = threading.Condition()
    sessions = [Session(c.create_session().session_id, progress) for c in clients]
    stop = threading.Event()
    threads = [threading.Thread(target=drive, args=(c, s, pcm, frames, stop)) for c, s in zip(clients, sessions)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)  # let the sessions get going before the first fault (they run in real time)
        replacements = {}
        for deployment in ("LLMCore", "AudioEncoder", "VisionEncoder", "Gateway", "TTSDecoder"):
            replacements[deployment] = wait_for_replacement(deployment, kill_all(deployment))
        served.redis.restart()
        faults_over = time.monotonic()
        with progress:  # the sessions go on after the last fault: each prefills units and answers again
            went_on = progress.wait_for(lambda: all(s.went_on(faults_over) for s in sessions), timeout=60)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    print("replacement seconds:", {k: round(v, 1) for k, v in replacements.items()})
    after = {s.sid: s.since(faults_over) for s in sessions}
    print("units and answers after the last fault:", after)
    assert went_on, after
    for c, s in zip(clients, sessions):
        # every failure was retryable and none hung: each arrived within 10 s of its call's start or of the last
        # fault, whichever was later (a call waits while the replacement of a stage it needs starts, so one that
        # spans back-to-back faults may wait through several restarts before one of them fails it)
        assert all(code in ("UNAVAILABLE", "INTERNAL") and ended < max(started, faults_over) + 10
                   for code, started, ended in s.failures), s.failures  # fmt: skip
        # not stranded: the session answers now, with its context (its token count never went back to a fresh one)
        info = c.get_session(s.sid)
        assert c.respond(s.sid, generation_options(max_new_tokens=3, greedy=True)).final.usage.completion_tokens
        assert info.units >= len(s.unit_times)  # no unit was lost to a fault (a retried one may count twice)
        assert min(s.tokens[len(s.tokens) // 2 :]) > min(s.tokens[:3])
        c.close_session(s.sid)
        c.close()
