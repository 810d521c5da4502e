"""A live session longer than its context window (the e2e stack's window is shortened to 1536 tokens, keeping
768): its KV is rolled in the background to its system prompt, its turns' text and its latest units; its replay
log in Redis shrinks with it; the system prompt (with the caller's instructions) stays whole; and it answers
exactly as a fresh session prefilled with that retained content."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from protos.minicpmo.v1 import llm_pb2
from services.common.generation import GREEDY
from services.gateway.prompts import assistant_prefix
from services.gateway.tokenizer import SpecialTokens, load_tokenizer
from services.llm_core.context_window import embeddings
from services.llm_core.generate import generate_solo
from services.llm_core.model import load_llm_model
from services.runtime.ownership import OwnershipStore
from tests.e2e.media import image_bytes, wav
from tests.e2e.test_sessions import feed_units, greedy
from tests.stack import CONTEXT_WINDOW

pytestmark = [pytest.mark.ray, pytest.mark.redis, pytest.mark.slow]


def llm_log(redis_url: str, sid: str):
    async def read():
        store = OwnershipStore.from_url(redis_url)
        try:
            return await store.log(sid, "llm")
        finally:
            await store.aclose()

    return asyncio.run(read())


def fresh_session_answer(model_dir: str, entries, n: int) -> list[int]:
    """A fresh session (in this process) prefilled with the logged content, then greedy as the pipeline answers."""
    tok = load_tokenizer(model_dir)
    model = load_llm_model(model_dir)
    cache = model.new_cache()
    model.step(torch.cat([embeddings(e, model.embed_tokens) for e in entries]), cache)
    prefix = model.embed(torch.tensor(assistant_prefix(tok).input_ids))
    stop = SpecialTokens.from_tokenizer(tok).stop_ids
    return generate_solo(model, prefix, GREEDY.with_(max_new_tokens=n), stop, cache=cache).ids


def test_long_session_rolls_and_answers_like_a_fresh_one(served, client, golden):
    window, _ = CONTEXT_WINDOW
    pcm = np.concatenate([wav(golden, "unit_audio_2s.wav")] * 10)  # 20 s: ~90 tokens per unit, past the window
    frames = [image_bytes(golden, "image_unit0.png"), image_bytes(golden, "image_unit1.png")]
    system = client.create_session(instructions="Answer briefly and remember what you saw.")
    sid = system.session_id
    feed_units(client, sid, pcm[: 6 * 16000], frames)
    client.append(sid, text="Remember this.")
    first = client.respond(sid, greedy(6))
    feed_units(client, sid, pcm[6 * 16000 :], frames)
    deadline = time.monotonic() + 60
    while (tokens := client.get_session(sid).token_count) >= window and time.monotonic() < deadline:
        time.sleep(0.2)  # polling for the background roll
    assert tokens < window, f"the session holds {tokens} tokens, its window is {window}"

    log = llm_log(served.redis_url, sid)
    kinds = [e.prefill.kind if e.HasField("prefill") else "answer" for e in log]
    assert log[0].llm_tokens == system.token_count  # the system prompt, with the caller's instructions, stays whole
    assert kinds[0] == llm_pb2.PREFILL_KIND_SYSTEM and "answer" in kinds and llm_pb2.PREFILL_KIND_TEXT in kinds
    assert kinds[-1] == llm_pb2.PREFILL_KIND_UNIT  # the latest units stay
    assert sum(e.llm_tokens for e in log) == tokens  # the log holds exactly what the KV holds
    assert any(e.answer.streamed_ids == list(first.token_ids) for e in log if e.HasField("answer"))

    answer = client.respond(sid, greedy(8))
    client.close_session(sid)
    assert answer.token_ids == fresh_session_answer(served.model_dir, log, 8)
