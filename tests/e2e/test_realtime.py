"""The Realtime WebSocket API with the official `openai` package's realtime client: server-side turn detection
(speech, then silence -> an answer with text and audio deltas), barge-in (speech during an answer cancels it),
bad events answered with `error` while the conversation goes on, a manual turn with an image and text, and the
live session freed when the socket closes."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
import openai
import pytest
import redis
import soxr
import websockets

from services.gateway.auth import key_hash
from tests.e2e.media import image_bytes, wav

pytestmark = [pytest.mark.ray, pytest.mark.redis]
MODEL = "MiniCPM-o-2_6"
CHUNK_MS = 100


def pcm16_b64(pcm_16k: np.ndarray) -> str:
    pcm = soxr.resample(pcm_16k, 16000, 24000) if pcm_16k.size else pcm_16k
    return base64.b64encode((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()).decode()


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * 16000), np.float32)


async def stream_audio(conn, pcm: np.ndarray) -> None:
    """The audio as a microphone client sends it: 100 ms appends (faster than real time; VAD counts samples)."""
    step = 16000 * CHUNK_MS // 1000
    for i in range(0, pcm.shape[0], step):
        await conn.input_audio_buffer.append(audio=pcm16_b64(pcm[i : i + step]))


async def events_until(conn, last: str, timeout: float = 180.0) -> list:
    """Events up to and including the first of type `last`."""
    events = []
    async with asyncio.timeout(timeout):
        while True:
            event = await conn.recv()
            events.append(event)
            if event.type == last:
                return events


def kinds(events) -> list[str]:
    return [e.type for e in events]


def owned_sessions(redis_url: str, api_key: str) -> set[str]:
    """The live sessions in Redis that this key created."""
    r = redis.Redis.from_url(redis_url)
    owner = key_hash(api_key).encode()
    return {
        k.decode().split("{")[1].split("}")[0] for k in r.scan_iter("minicpmo:*:rec") if r.hget(k, "owner") == owner
    }


@pytest.fixture
def realtime(served):
    """A connection factory; the key is the second e2e key, whose sessions these tests count."""
    client = openai.AsyncOpenAI(base_url=f"{served.http_url}/v1", api_key=served.keys[1], max_retries=0)

    def connect():
        return client.realtime.connect(model=MODEL)

    return connect


def vad_session(**session) -> dict:
    return {"type": "realtime", "output_modalities": ["audio"], "temperature": 0, **session,
            "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 500,
                                                   "prefix_padding_ms": 300}},
                      "output": {"voice": "audio_assistant"}}}  # fmt: skip


def test_vad_turn_then_spoken_answer_and_close_frees_the_session(served, realtime, golden):
    speech = wav(golden, "speech.wav")
    before = owned_sessions(served.redis_url, served.keys[1])

    async def run():
        async with realtime() as conn:
            created = await conn.recv()
            assert created.type == "session.created" and created.session.audio.input.turn_detection.type == "server_vad"
            await conn.session.update(session=vad_session(max_output_tokens=24))
            updated = await events_until(conn, "session.updated")
            assert updated[-1].session.audio.output.voice == "audio_assistant"
            await stream_audio(conn, np.concatenate([silence(0.6), speech, silence(1.2)]))
            events = await events_until(conn, "response.done")
            during = owned_sessions(served.redis_url, served.keys[1]) - before
        return events, during

    events, during = asyncio.run(run())
    seq = kinds(events)
    turn = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
            "response.created"]  # fmt: skip
    assert [k for k in seq if k in turn] == turn, seq
    started = events[seq.index("input_audio_buffer.speech_started")]
    stopped = events[seq.index("input_audio_buffer.speech_stopped")]
    committed = events[seq.index("input_audio_buffer.committed")]
    assert 600 - 300 - 100 <= started.audio_start_ms <= 600 - 300 + 200  # speech at 0.6 s, 300 ms padding
    assert 600 + 2200 + 500 <= stopped.audio_end_ms <= 600 + 2600 + 500 + 200  # 500 ms of silence after it
    assert started.item_id == stopped.item_id == committed.item_id
    transcript = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
    audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
    assert transcript and len(audio) > 0 and len(audio) % 2 == 0
    done = events[-1].response
    assert done.status in ("completed", "incomplete") and 1 <= done.usage.output_tokens <= 24
    assert done.output[0].content[0].transcript == transcript
    assert len(during) == 1, "one live session per connection"
    deadline = time.monotonic() + 15  # the server frees it as soon as it sees the socket close
    while owned_sessions(served.redis_url, served.keys[1]) & during and time.monotonic() < deadline:
        time.sleep(0.1)
    assert owned_sessions(served.redis_url, served.keys[1]) & during == set(), "closing the socket frees it"


def test_speech_during_an_answer_cancels_it(realtime, golden):
    speech = wav(golden, "speech.wav")

    async def run():
        async with realtime() as conn:
            await conn.session.update(session=vad_session(max_output_tokens=1500))
            await events_until(conn, "session.updated")
            await stream_audio(conn, np.concatenate([speech, silence(1.0)]))
            first = await events_until(conn, "response.output_audio.delta")  # the answer is playing
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 6})  # for the next answer
            await stream_audio(conn, np.concatenate([speech, silence(1.0)]))  # the user talks over it
            barge = await events_until(conn, "response.done")
            second = await events_until(conn, "response.done")
        return first, barge, second

    first, barge, second = asyncio.run(run())
    assert "response.created" in kinds(first)
    assert "input_audio_buffer.speech_started" in kinds(barge)
    cancelled = barge[-1].response
    assert cancelled.status == "cancelled" and cancelled.status_details.reason == "turn_detected"
    assert cancelled.usage.output_tokens < 1500
    seq = kinds(second)
    assert seq.index("input_audio_buffer.committed") < seq.index("response.created")
    assert second[-1].response.status in ("completed", "incomplete") and second[-1].response.usage.output_tokens <= 6


def test_instructions_are_set_before_the_conversation_and_fixed_after_it_started(realtime):
    async def ask(conn, question: str) -> list:
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": question}]})  # fmt: skip
        await events_until(conn, "conversation.item.done")
        await conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": 4})
        return await events_until(conn, "response.done")

    async def run():
        async with realtime() as conn:
            await conn.recv()  # session.created
            await conn.session.update(session={"type": "realtime", "instructions": "Answer in one word.",
                                               "audio": {"input": {"turn_detection": None}}})  # fmt: skip
            updated = await events_until(conn, "session.updated")
            first = await ask(conn, "Hello")
            await conn.send_raw(json.dumps({"type": "session.update", "session": {"instructions": "Be a pirate."}}))
            refused = await conn.recv()
            second = await ask(conn, "And now?")
        return updated, first, refused, second

    updated, first, refused, second = asyncio.run(run())
    assert updated[-1].session.instructions == "Answer in one word."
    assert refused.type == "error" and refused.error.param == "session.instructions"
    assert "fixed once the conversation has started" in refused.error.message
    for answer in (first, second):
        assert answer[-1].response.status in ("completed", "incomplete")
        assert answer[-1].response.usage.output_tokens <= 4


def test_bad_events_get_errors_and_the_conversation_goes_on(realtime, golden):
    png = image_bytes(golden, "image_small.png")

    async def run():
        async with realtime() as conn:
            await conn.recv()  # session.created
            errors = []
            bad_events = [
                "{not json",
                b"\x00\x01 binary",
                json.dumps({"type": "input_audio_buffer.shout"}),
                json.dumps({"type": "input_audio_buffer.append", "audio": "***", "event_id": "evt_1"}),
                json.dumps({"type": "response.cancel"}),
                json.dumps({"type": "session.update", "session": {"audio": {"output": {"voice": "alloy"}}}}),
            ]
            for bad in bad_events:
                await conn.send_raw(bad)
                errors.append(await conn.recv())
            # then a manual turn: turn detection off, an image and text, a text-only answer asked for
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
            updated = await events_until(conn, "session.updated")
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_image", "image_url": "data:image/png;base64," + base64.b64encode(png).decode()},
                {"type": "input_text", "text": "What is in the picture?"}]})  # fmt: skip
            added = await events_until(conn, "conversation.item.done")
            await conn.input_audio_buffer.append(audio=pcm16_b64(wav(golden, "speech.wav")))
            await conn.input_audio_buffer.commit()
            committed = await events_until(conn, "input_audio_buffer.committed")
            await conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": 8})
            answer = await events_until(conn, "response.done")
        return errors, updated, added, committed, answer

    errors, updated, added, committed, answer = asyncio.run(run())
    assert [e.type for e in errors] == ["error"] * 6
    codes = [(e.error.type, e.error.param) for e in errors]
    assert codes[0][0] == codes[1][0] == codes[2][0] == "invalid_request_error"
    assert "binary" in errors[1].error.message and "shout" in errors[2].error.message
    assert codes[3] == ("invalid_request_error", "audio") and errors[3].error.event_id == "evt_1"
    assert codes[4][0] == "conflict_error"
    assert codes[5] == ("invalid_request_error", "session.audio.output.voice")
    assert updated[-1].session.audio.input.turn_detection is None
    assert added[-1].item.content[1].text == "What is in the picture?"
    assert committed[-1].type == "input_audio_buffer.committed"
    seq = kinds(answer)
    assert "response.output_text.delta" in seq and "response.output_audio.delta" not in seq
    assert answer[-1].response.status in ("completed", "incomplete") and answer[-1].response.usage.output_tokens <= 8


def test_unknown_key_gets_an_error_then_the_socket_closes(served):
    async def run():
        url = served.http_url.replace("http", "ws") + f"/v1/realtime?model={MODEL}"
        async with websockets.connect(url, subprotocols=["realtime", "openai-insecure-api-key.not-a-key"]) as ws:
            event = json.loads(await ws.recv())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
        return event, closed.value

    event, closed = asyncio.run(run())
    assert event["type"] == "error" and event["error"]["type"] == "authentication_error"
    assert closed.rcvd.code == 1008
