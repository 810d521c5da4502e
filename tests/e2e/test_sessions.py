"""Live sessions over a real gRPC channel: TDM units from small audio chunks, spoken answers, interrupts,
isolation between concurrent sessions, API-key ownership, and cleanup of Redis keys."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest
import redis

from protos.minicpmo.v1 import omni_pb2
from services.client.sdk import audio_msg, generation_options
from services.gateway.sessions import SessionRecords
from services.gateway.stages import RayStages
from tests.e2e.driver import local_driver
from tests.e2e.media import chunks, image_bytes, wav

pytestmark = [pytest.mark.ray, pytest.mark.redis]

CHUNK = 3200  # 200 ms of 16 kHz audio per AppendUnit, as a live client sends it


def feed_units(client, sid: str, pcm: np.ndarray, frames: list[bytes]) -> int:
    """Stream `pcm` in 200 ms chunks with one frame per second; returns the units prefilled."""
    units = 0
    per_second = 16000 // CHUNK
    for i, piece in enumerate(chunks(pcm, CHUNK)):
        frame = [frames[(i // per_second) % len(frames)]] if i % per_second == 0 else []
        units += client.append(sid, audio=piece, frames=frame).units_prefilled
    return units


@pytest.fixture
def unit_inputs(golden):
    pcm = wav(golden, "unit_audio_2s.wav")
    frames = [image_bytes(golden, "image_unit0.png"), image_bytes(golden, "image_unit1.png")]
    return pcm, frames


def greedy(n: int, speech: bool = False, min_new: int = 0) -> omni_pb2.GenerationOptions:
    return generation_options(max_new_tokens=n, min_new_tokens=min_new, greedy=True, speech=speech, speech_greedy=True)


def test_live_units_then_spoken_answer(client, golden, unit_inputs):
    pcm, frames = unit_inputs
    info = client.create_session(reference_voice=wav(golden, "ref_voice_1s.wav"))
    sid = info.session_id
    assert info.token_count > 0 and info.state == omni_pb2.SESSION_STATE_IDLE
    units = feed_units(client, sid, np.concatenate([pcm, pcm]), frames)  # 4 s -> 4 complete units
    assert units == 4
    mid = client.get_session(sid)
    assert mid.state == omni_pb2.SESSION_STATE_LISTENING and mid.token_count > info.token_count
    answer = client.respond(sid, greedy(30, speech=True, min_new=30))
    assert answer.final.usage.completion_tokens == 30
    assert len(answer.chunks) >= 2 and answer.audio.size > 0 and np.isfinite(answer.audio).all()
    after = client.get_session(sid)
    assert after.token_count == answer.final.usage.session_tokens
    client.close_session(sid)


def test_partial_second_is_flushed_on_respond(client, unit_inputs):
    pcm, frames = unit_inputs
    sid = client.create_session().session_id
    r = client.append(sid, audio=pcm[:24000], frames=frames[:1])  # 1.5 s: one unit, 0.5 s pending
    assert r.units_prefilled == 1 and r.pending_audio_ms == 500
    before = client.get_session(sid).token_count
    answer = client.respond(sid, greedy(4))
    assert answer.final.usage.session_tokens > before + answer.final.usage.prompt_tokens  # the flushed unit is in
    assert client.get_session(sid).pending_audio_ms == 0
    client.close_session(sid)


def test_interrupt_then_new_turn(client, unit_inputs):
    pcm, frames = unit_inputs
    sid = client.create_session().session_id
    feed_units(client, sid, pcm, frames)
    long = 1500  # ~4 s of decoding for the tiny model here: the answer is still running below
    stream = client.respond_stream(sid, greedy(long, min_new=long))
    first = next(stream)  # the answer is running
    assert first.WhichOneof("event") in ("text_delta", "audio", "final")
    asked = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:  # one answer at a time per session
        client.respond(sid, greedy(2))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # refused once the running answer renewed its lease (a heartbeat a second), not after waiting the lease out
    assert time.monotonic() - asked < SessionRecords.DEFAULT_ANSWER_LEASE_S
    assert client.interrupt(sid).was_responding
    rest = [first, *stream]
    final = rest[-1].final
    assert final.finish_reason == omni_pb2.FINISH_REASON_INTERRUPTED
    assert final.usage.completion_tokens < long
    # the next user turn starts the upstream way (after `<|tts_eos|>`), and answers normally
    assert client.append(sid, text="And now?").token_count > final.usage.session_tokens
    again = client.respond(sid, greedy(5))
    assert again.final.usage.completion_tokens >= 1
    assert not client.interrupt(sid).was_responding
    client.close_session(sid)


def run_session(client, pcm, frames, text: str) -> list[int]:
    sid = client.create_session().session_id
    feed_units(client, sid, pcm, frames)
    client.append(sid, text=text)
    ids = client.respond(sid, greedy(8)).token_ids
    client.close_session(sid)
    return ids


def test_interleaved_sessions_are_isolated(served, unit_inputs):
    """Two sessions fed concurrently answer exactly as each does alone."""
    from services.client.sdk import MiniCPMOClient

    pcm, frames = unit_inputs
    inputs = [(pcm, frames, "Tell me about the first one."), (pcm[::-1].copy(), frames[::-1], "Something else?")]
    with MiniCPMOClient(served.target, api_key=served.keys[0]) as c:
        alone = [run_session(c, *args) for args in inputs]
    results: list = [None, None]

    def worker(i):
        with MiniCPMOClient(served.target, api_key=served.keys[0]) as c:
            results[i] = run_session(c, *inputs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
    assert alone[0] != alone[1]


def test_session_of_another_key_is_refused(client, other_client):
    sid = client.create_session().session_id
    for call in (
        lambda: other_client.get_session(sid),
        lambda: other_client.append(sid, text="hi"),
        lambda: other_client.respond(sid, greedy(2)),
        lambda: other_client.interrupt(sid),
        lambda: other_client.close_session(sid),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert client.get_session(sid).session_id == sid  # untouched
    client.close_session(sid)


def test_session_errors(client):
    with pytest.raises(grpc.RpcError) as err:
        client.get_session("no-such-session")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        client.append("no-such-session", text="hi")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    sid = client.create_session().session_id
    with pytest.raises(grpc.RpcError) as err:
        client.append(sid, audio=np.full(100, np.nan, np.float32))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        client.append(sid, frames=[b"not an image"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        client.append(sid)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        client.create_session(mode=omni_pb2.VOICE_MODE_VOICE_CLONING)  # needs a reference voice
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.respond(sid, greedy(2)).final.usage.completion_tokens >= 1  # the session still works
    client.close_session(sid)


def _keys(redis_url: str, sid: str) -> list[bytes]:
    r = redis.Redis.from_url(redis_url)
    try:
        return r.keys(f"*{sid}*")
    finally:
        r.close()


def test_closed_session_leaves_no_redis_keys(served, client, unit_inputs):
    pcm, frames = unit_inputs
    sid = client.create_session().session_id
    feed_units(client, sid, pcm, frames)
    client.respond(sid, greedy(3))
    assert _keys(served.redis_url, sid)
    client.close_session(sid)
    assert _keys(served.redis_url, sid) == []
    with pytest.raises(grpc.RpcError) as err:
        client.respond(sid, greedy(2))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_idle_session_expires_everywhere(served, client, unit_inputs):
    """An idle session's keys expire together in Redis (the TTL is shortened here to what idling out does, so the
    test need not wait the configured minutes) and every later call gets NOT_FOUND."""
    pcm, frames = unit_inputs
    sid = client.create_session().session_id
    feed_units(client, sid, pcm, frames)
    assert client.get_session(sid).idle_ttl_s == served.idle_ttl_s
    r = redis.Redis.from_url(served.redis_url)
    try:
        for key in r.keys(f"*{sid}*"):
            assert 0 < r.ttl(key) <= served.idle_ttl_s
            r.pexpire(key, 50)
    finally:
        r.close()
    deadline = time.monotonic() + 10
    while _keys(served.redis_url, sid) and time.monotonic() < deadline:
        time.sleep(0.02)  # polling Redis for the expiry
    assert _keys(served.redis_url, sid) == []
    for call in (lambda: client.get_session(sid), lambda: client.append(sid, audio=pcm[:3200]),
                 lambda: client.respond(sid, greedy(2))):  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_session_token_limit_is_refused_and_session_survives(served, client):
    sid = client.create_session().session_id
    limit = served.max_session_tokens
    refused = None
    for _ in range(64):  # ~1000 chars per append: the limit is hit long before the loop ends
        try:
            client.append(sid, text="The quick brown fox jumps over the lazy dog. " * 22)
        except grpc.RpcError as e:
            refused = e
            break
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
    info = client.get_session(sid)
    assert info.token_count <= limit
    client.close_session(sid)
    other = client.create_session().session_id  # the replicas keep serving
    assert client.respond(other, greedy(2)).final.usage.completion_tokens >= 1
    client.close_session(other)


def test_a_full_llm_replica_refuses_the_next_session_and_admits_it_once_one_closes(client):
    """The stack's one LLMCore replica promises each live session its whole token limit, with a context roll's room
    kept free (31 sessions of 2048 tokens in its 65536-token arena): the next CreateSession is refused with an
    actionable RESOURCE_EXHAUSTED, the admitted sessions are untouched, and a closed session's room goes to a
    newcomer."""
    opened: list[str] = []
    try:
        refused = None
        for _ in range(32):  # sessions other tests left open count too
            try:
                opened.append(client.create_session().session_id)
            except grpc.RpcError as e:
                refused = e
                break
        assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert "KV arena full" in refused.details() and "kv_budget_tokens" in refused.details()
        assert client.respond(opened[0], greedy(2)).final.usage.completion_tokens >= 1
        client.close_session(opened.pop())
        opened.append(created_once_room_is_free(client))
    finally:
        for sid in opened:
            client.close_session(sid)
    client.close_session(created_once_room_is_free(client))  # the next test finds the room free again


def created_once_room_is_free(client, timeout_s: float = 30.0) -> str:
    """A new session, retried while LLMCore is still full: the gateway drops closed sessions' KV in the
    background."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.create_session().session_id
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise


def in_process_live_greedy(model_dir: str, ref: np.ndarray, pcm: np.ndarray, frames: list[bytes], n: int) -> list[int]:
    """Upstream's streaming_prefill (system prompt with its voice, then 1 s units) + streaming_generate, greedy,
    run in this process with the components alone."""
    import io

    import torch
    from PIL import Image

    from services.audio_encoder.encoder import AudioEmbedder
    from services.common.generation import GREEDY
    from services.common.image_layout import ImageProcessorConfig
    from services.gateway.prompts import (
        AudioRef,
        ImageRef,
        Message,
        PlaceholderSettings,
        StreamingPromptState,
        assistant_prefix,
        build_streaming_prefill,
        system_prompt,
    )  # fmt: skip
    from services.gateway.tokenizer import SpecialTokens, load_tokenizer
    from services.llm_core.generate import generate_solo
    from services.llm_core.model import load_llm_model
    from services.vision_encoder.encoder import ImageEmbedder
    from tests.e2e.test_chat import _spread

    tok = load_tokenizer(model_dir)
    sp = SpecialTokens.from_tokenizer(tok)
    settings = PlaceholderSettings.streaming(ImageProcessorConfig.from_model_dir(model_dir))
    model, vision, audio = load_llm_model(model_dir), ImageEmbedder.from_checkpoint(model_dir), AudioEmbedder.from_checkpoint(model_dir)
    state, cache = StreamingPromptState(), model.new_cache()

    def prefill(prompt, image_rows=None, audio_rows=None):
        pieces = (_spread(prompt.image_bounds, image_rows) if image_rows is not None else []) + (
            _spread(prompt.audio_bounds, audio_rows) if audio_rows is not None else [])
        model.step(model.embed(torch.tensor(prompt.input_ids), pieces), cache)

    system = build_streaming_prefill(system_prompt("omni", "en", AudioRef(len(ref))), state, tok, settings=settings)
    prefill(system, audio_rows=audio.encode_chunk(audio.new_stream(), ref))  # throwaway stream, as upstream
    stream = audio.new_stream()
    for k in range(len(pcm) // 16000):
        frame = frames[k % len(frames)]
        size = Image.open(io.BytesIO(frame)).size
        unit = Message("user", ["<unit>", ImageRef(size), AudioRef(16000)])
        prompt = build_streaming_prefill(unit, state, tok, settings=settings)
        prefill(prompt, vision.encode([frame], 1)[0].embeddings, audio.encode_chunk(stream, pcm[16000 * k : 16000 * (k + 1)]))
    prefix = assistant_prefix(tok)
    embeds = model.embed(torch.tensor(prefix.input_ids))
    return generate_solo(model, embeds, GREEDY.with_(max_new_tokens=n), [sp.im_end, sp.endoftext], cache=cache).ids


def test_live_session_greedy_equals_in_process(served, client, golden, unit_inputs):
    pcm, frames = unit_inputs
    ref = wav(golden, "ref_voice_1s.wav")
    sid = client.create_session(reference_voice=ref).session_id
    feed_units(client, sid, pcm, frames)  # 200 ms chunks, a frame at the start of each second
    answer = client.respond(sid, greedy(12))
    client.close_session(sid)
    assert answer.token_ids == in_process_live_greedy(served.model_dir, ref, pcm, frames, 12)


class RecordingStages(RayStages):
    """The deployments' stage calls, recording the frames sent to the VisionEncoder, in order."""

    def __init__(self, handles: list):
        super().__init__(*handles)
        self.encoded: list[bytes] = []

    def encode_images(self, request):
        self.encoded.append(request.images[0])
        return super().encode_images(request)


async def drive_one_second(served, pushes: list[tuple[bytes | None, np.ndarray]]) -> tuple[list[list[bytes]], list[int]]:
    """A session fed `pushes` (frame or None, audio) through the driver: the frames encoded after each push, and
    the session's greedy answer."""
    seen = []
    async with local_driver(served, RecordingStages) as (live, caller, stages):
        sid = (await live.create(caller, omni_pb2.CreateSessionRequest())).session_id
        for frame, pcm in pushes:
            await live.append(caller, omni_pb2.AppendUnitRequest(
                session_id=sid, audio=audio_msg(pcm), frames=[omni_pb2.Image(data=frame)] if frame else []))
            seen.append(list(stages.encoded))
        events = [e async for e in live.respond(caller, omni_pb2.RespondRequest(session_id=sid, options=greedy(8)))]
        await live.close(caller, sid)
    return seen, list(events[-1].final.token_ids)


def test_first_frame_of_a_second_is_encoded_on_arrival_and_the_latest_is_used(served, unit_inputs):
    pcm, (a, b) = unit_inputs
    seen, answer = asyncio.run(drive_one_second(served, [(a, pcm[:CHUNK]), (b, pcm[CHUNK : 2 * CHUNK]),
                                                         (None, pcm[2 * CHUNK : 16000])]))  # fmt: skip
    assert seen == [[a], [a], [a, b]]  # a at once; b, which replaced a in the unit, when the second completed
    assert answer == asyncio.run(drive_one_second(served, [(b, pcm[:16000])]))[1]
    assert answer != asyncio.run(drive_one_second(served, [(a, pcm[:16000])]))[1]  # the frame shows in the answer


async def fed_by_turns(served, pieces: list[np.ndarray], replicas: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """A session fed `pieces` of audio, piece i through gateway replica `replicas[i]` (each a live-session driver
    of its own, as two Gateway replicas are): (units prefilled, pending audio ms) of each call, and the answer."""
    def stages(handles: list) -> RayStages:
        return RayStages(*handles)

    async with local_driver(served, stages) as (first, caller, _), local_driver(served, stages) as (second, *_):
        gateways = [first, second]
        sid = (await first.create(caller, omni_pb2.CreateSessionRequest())).session_id
        seen = []
        for pcm, r in zip(pieces, replicas):
            reply = await gateways[r].append(caller, omni_pb2.AppendUnitRequest(session_id=sid, audio=audio_msg(pcm)))
            seen.append((reply.units_prefilled, reply.pending_audio_ms))
        units = (await gateways[replicas[-1]].info(caller, sid)).units
        events = [e async for e in gateways[replicas[-1]].respond(
            caller, omni_pb2.RespondRequest(session_id=sid, options=greedy(8)))]  # fmt: skip
        await first.close(caller, sid)
    return seen + [(units, -1)], list(events[-1].final.token_ids)


def test_session_moved_to_another_gateway_and_back_continues_exactly(served, unit_inputs):
    """A scale-up moves a session to a new gateway replica, a scale-down moves it back: the replica it returns to
    still holds the muxer of before the move. It must continue from what the other replica left in Redis (here
    0.2 s of pending audio, one unit more), not from its own stale copy, and answer as one replica would."""
    pcm, _ = unit_inputs
    pieces = [pcm[:6400], pcm[6400:19200], pcm[19200:32000]]  # 0.4 s, then 0.8 s, then 0.8 s
    moved, answer = asyncio.run(fed_by_turns(served, pieces, [0, 1, 0]))
    assert moved == [(0, 400), (1, 200), (1, 0), (2, -1)]
    assert answer == asyncio.run(fed_by_turns(served, pieces, [0, 0, 0]))[1]
