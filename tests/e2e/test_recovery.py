"""Replica loss: killing the LLMCore replica that owns a session's KV, then continuing the session, gives the
same greedy continuation as a session that was never interrupted (rebuilt from the Redis replay log).

Retries are idempotent: a stage replica that logged a request and died before replying leaves the session
holding that request while its caller saw a failure; the caller (the gateway) sends the same request again."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
import ray
import torch
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError

from protos.minicpmo.v1 import audio_pb2, llm_pb2
from services.common.tensor_codec import from_proto, to_proto
from services.gateway.live import prompt_state
from services.gateway.pipeline import Limits, prefill_input, sampling_msg, sampling_params
from services.gateway.prompts import AudioRef, Message, PlaceholderSettings, assistant_prefix, build_streaming_prefill
from services.gateway.sessions import SessionStore
from services.gateway.tokenizer import load_tokenizer
from services.common.generation import STREAMING_DEFAULTS
from services.vision_encoder.processor import ImageProcessorConfig
from tests.e2e.conftest import APP_NAME
from tests.e2e.media import image_bytes, wav
from tests.e2e.test_sessions import feed_units, greedy

pytestmark = [pytest.mark.ray, pytest.mark.redis, pytest.mark.slow]


def replicas(deployment: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"#{deployment}#" in a["name"]]


def kill_all(deployment: str) -> None:
    names = replicas(deployment)
    assert names, f"no {deployment} replica found"
    for name in names:  # one replica owns every session here; with more, the owner is among them
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def with_store(redis_url: str, use):
    async def run():
        store = SessionStore.from_url(redis_url)
        try:
            return await use(store)
        finally:
            await store.aclose()

    return asyncio.run(run())


def lease_epoch(redis_url: str, sid: str, role: str = "llm") -> int:
    async def get(store) -> int:
        fence = await store.lease(sid, role)
        return fence.epoch if fence else 0

    return with_store(redis_url, get)


def conversation(client, golden, on_middle=None) -> tuple[str, list[int], list[int]]:
    pcm = wav(golden, "unit_audio_2s.wav")
    frames = [image_bytes(golden, "image_unit0.png"), image_bytes(golden, "image_unit1.png")]
    sid = client.create_session().session_id
    feed_units(client, sid, pcm, frames)
    first = client.respond(sid, greedy(6)).token_ids
    if on_middle is not None:
        on_middle(sid)
    feed_units(client, sid, pcm[::-1].copy(), frames)
    client.append(sid, text="Go on.")
    second = client.respond(sid, greedy(10)).token_ids
    return sid, first, second


def test_killed_llm_owner_continues_identically(served, client, golden):
    ref_sid, ref_first, ref_second = conversation(client, golden)
    client.close_session(ref_sid)
    epochs = {}

    def kill_owner(sid: str) -> None:
        epochs["before"] = lease_epoch(served.redis_url, sid)
        kill_all("LLMCore")

    sid, first, second = conversation(client, golden, on_middle=kill_owner)
    assert first == ref_first
    assert second == ref_second
    assert lease_epoch(served.redis_url, sid) > epochs["before"]  # a new replica took the session over
    client.close_session(sid)


def test_killed_audio_owner_continues_identically(served, client, golden):
    """The streaming Whisper state is rebuilt from the logged chunks: later units encode as if nothing happened."""
    ref_sid, ref_first, ref_second = conversation(client, golden)
    client.close_session(ref_sid)
    epochs = {}

    def kill_owner(sid: str) -> None:
        epochs["before"] = lease_epoch(served.redis_url, sid, "audio")
        kill_all("AudioEncoder")

    sid, first, second = conversation(client, golden, on_middle=kill_owner)
    assert (first, second) == (ref_first, ref_second)
    assert lease_epoch(served.redis_url, sid, "audio") > epochs["before"]
    client.close_session(sid)


def lose_reply(served, deployment: str, sid: str) -> None:
    """Kill the replica that just served `sid` (it logged and applied the request; its reply counts as lost) and
    wait for its replacement, keeping the session from idling out meanwhile (the e2e TTL is seconds)."""
    old = set(replicas(deployment))
    kill_all(deployment)
    while not set(replicas(deployment)) - old:
        with_store(served.redis_url, lambda store: store.touch(sid))
        time.sleep(0.2)


def stage(deployment: str, sid: str):
    return serve.get_deployment_handle(deployment, APP_NAME).options(session_id=sid)


def call(deployment: str, sid: str, method: str, request, *args):
    """A stage call retried as the gateway retries it (same request) while the session's owner is replaced."""
    for _ in range(120):
        try:
            return getattr(stage(deployment, sid), method).remote(request, *args).result()
        except (ActorDiedError, ActorUnavailableError):
            time.sleep(0.25)
    raise TimeoutError(f"{deployment}.{method} of {sid} kept failing")


def answer_tokens(sid: str, gen: llm_pb2.GenerateRequest) -> tuple[list[int], int]:
    for _ in range(120):
        try:
            events = list(stage("LLMCore", sid).Generate.options(stream=True).remote(gen))
            return [t for ev in events for t in ev.token_ids], events[-1].stop
        except (ActorDiedError, ActorUnavailableError):
            time.sleep(0.25)
    raise TimeoutError(f"LLMCore.Generate of {sid} kept failing")


def stage_turn(served, golden, sid: str, lose_replies: bool) -> list[int]:
    """One audio unit and one answer sent to the stages exactly as the gateway sends them. With `lose_replies`,
    the replica that served each request is killed after it logged and applied it (its reply "lost"), and the
    request is sent again, as the gateway's retry does: each must be answered as before, not applied twice."""
    tok = load_tokenizer(served.model_dir)
    settings = PlaceholderSettings.streaming(ImageProcessorConfig.from_model_dir(served.model_dir))
    pcm = wav(golden, "unit_audio_2s.wav")[:16000]
    chunk = audio_pb2.EncodeChunkRequest(session_id=sid, pcm=to_proto(torch.from_numpy(pcm)), request_id=f"c-{sid}")
    encoded = call("AudioEncoder", sid, "EncodeChunk", chunk)
    if lose_replies:
        lose_reply(served, "AudioEncoder", sid)
        again = call("AudioEncoder", sid, "EncodeChunk", chunk)
        assert torch.equal(from_proto(again.embeddings), from_proto(encoded.embeddings))

    prev = with_store(served.redis_url, lambda store: store.set_turn(sid, "user_turn"))
    unit = build_streaming_prefill(Message("user", ["<unit>", AudioRef(len(pcm))]), prompt_state(prev), tok, settings=settings)
    prefill = llm_pb2.PrefillRequest(session_id=sid, input=prefill_input(unit), log=True, request_id=f"u-{sid}")
    kv_len = call("LLMCore", sid, "Prefill", prefill, encoded).kv_len
    if lose_replies:
        lose_reply(served, "LLMCore", sid)
        assert call("LLMCore", sid, "Prefill", prefill, encoded).kv_len == kv_len

    with_store(served.redis_url, lambda store: store.set_turn(sid, "answering"))
    params = sampling_params(greedy(8), STREAMING_DEFAULTS, Limits())
    gen = llm_pb2.GenerateRequest(
        session_id=sid, input=prefill_input(assistant_prefix(tok)), sampling=sampling_msg(params), spk_position=-1,
        log=True, request_id=f"g-{sid}",
    )  # fmt: skip
    tokens, stop = answer_tokens(sid, gen)
    if lose_replies:
        lose_reply(served, "LLMCore", sid)
        assert answer_tokens(sid, gen) == (tokens, stop)  # streamed again from the log, not answered twice
    done = "answered" if stop == llm_pb2.STOP_REASON_EOS else "interrupted"
    with_store(served.redis_url, lambda store: store.set_turn(sid, done))
    return tokens


def retried_conversation(served, client, golden, lose_replies: bool):
    pcm = wav(golden, "unit_audio_2s.wav")
    frames = [image_bytes(golden, "image_unit0.png"), image_bytes(golden, "image_unit1.png")]
    sid = client.create_session().session_id
    feed_units(client, sid, pcm, frames)
    first = client.respond(sid, greedy(6)).token_ids
    middle = stage_turn(served, golden, sid, lose_replies)
    client.append(sid, text="Go on.")
    last = client.respond(sid, greedy(10)).token_ids
    log = with_store(served.redis_url, lambda store: store.replay(sid))
    return sid, (first, middle, last), log


def test_retry_after_lost_reply_is_applied_once(served, client, golden):
    """The "logged but not replied" window, forced: same greedy continuation as an uninterrupted session, and
    the replay log holds every request once."""
    ref_sid, ref_answers, ref_log = retried_conversation(served, client, golden, lose_replies=False)
    client.close_session(ref_sid)
    sid, answers, log = retried_conversation(served, client, golden, lose_replies=True)
    assert answers == ref_answers
    assert [(e.kind, e.n_tokens) for e in log] == [(e.kind, e.n_tokens) for e in ref_log]
    ids = Counter(e.meta.get("request_id") for e in log)
    assert all(ids[rid] == 1 for rid in (f"c-{sid}", f"u-{sid}", f"g-{sid}"))
    assert all(n == 1 for rid, n in ids.items() if rid)  # the gateway's own requests too
    client.close_session(sid)
