"""The continuous-batching engine on the golden checkpoint: every session's results equal its solo run.

Solo = `generate_solo` / `LLMModel.step` on a contiguous `SoloCache`, one sequence at a time. Prompts come
from the tokenizer (texts and the streaming prefixes) and from the golden streaming case's input embeddings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch

from services.common.generation import GREEDY, SamplingParams
from services.gateway.tokenizer import SpecialTokens, load_tokenizer
from services.llm_core.engine import (
    EngineFullError,
    EngineInputError,
    GenEvent,
    LLMEngine,
    NonFiniteScoresError,
    NumericsCheckError,
    SessionBusyError,
    SessionDroppedError,
    SessionStateError,
)
from services.llm_core.generate import generate_solo
from services.llm_core.model import LLMModel, load_llm_model
from services.runtime.errors import Internal

ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>"
NEXT_TURN = "<|im_end|>\n<|im_start|>user\n"
AFTER_INTERRUPT = "<|tts_eos|><|im_end|>\n<|im_start|>user\n"
TEXTS = [
    "Hello, how are you today?",
    "Describe the picture in one short sentence, please.",
    "你好，今天天气很好。",
    "What is the capital of France? Answer briefly and then explain why.",
    "Tell me a story about a red house next to a green tree, with many details.",
    "ok",
    "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "The quick brown fox jumps over the lazy dog near the river bank.",
]


@pytest.fixture(scope="module")
def model(golden) -> LLMModel:
    return load_llm_model(golden.checkpoint)


@pytest.fixture(scope="module")
def plain_model(golden) -> LLMModel:
    """The same weights with F.linear projections (the GPU path) instead of oneDNN-prepacked ones."""
    return load_llm_model(golden.checkpoint, prepack=False)


@pytest.fixture(scope="module")
def tok(golden):
    return load_tokenizer(golden.checkpoint)


@pytest.fixture(scope="module")
def special(tok) -> SpecialTokens:
    return SpecialTokens.from_tokenizer(tok)


def embed_text(model: LLMModel, tok, text: str) -> torch.Tensor:
    return model.embed(torch.tensor(tok.encode(text), dtype=torch.long))


def user_turn(text: str, after: str = "") -> str:
    return f"{after}<|im_start|>user\n{text}" if not after else f"{after}{text}"


@dataclass
class Generate:
    embeds: torch.Tensor
    params: SamplingParams
    spk_position: int | None = None


Turn = torch.Tensor | Generate  # a prefill (its embeddings) or an answer


def solo_run(model: LLMModel, turns: Sequence[Turn], stop_ids: Sequence[int]) -> list[list[int]]:
    """Each answer's ids when the session runs alone on a DynamicCache."""
    cache = model.new_cache()
    answers = []
    for t in turns:
        if isinstance(t, Generate):
            res = generate_solo(model, t.embeds, t.params, stop_ids, t.spk_position, cache=cache)
            answers.append(res.ids)
        else:
            model.step(t, cache)
    return answers


async def engine_run(
    engine: LLMEngine, sid: str, turns: Sequence[Turn], started: asyncio.Event | None = None
) -> list[list[int]]:
    answers = []
    for t in turns:
        if isinstance(t, Generate):
            ids = []
            async for ev in engine.generate(sid, t.embeds, t.params, t.spk_position):
                ids.append(ev.token_id)
                if started is not None:
                    started.set()
            answers.append(ids)
        else:
            await engine.prefill(sid, t)
    return answers


def make_engine(model: LLMModel, special: SpecialTokens, **kw) -> LLMEngine:
    kw.setdefault("kv_budget_tokens", 8192)
    kw.setdefault("max_batch_tokens", 48)  # small: long prompts are chunked and share steps with decodes
    kw.setdefault("stop_ids", special.stop_ids)
    engine = LLMEngine(model, **kw)
    engine.start()
    return engine


@pytest.mark.parametrize("prepack", [True, False], ids=["prepacked", "plain"])
def test_golden_streaming_session_through_the_engine_with_batch_mates(
    golden, model, plain_model, tok, special, prepack
):
    """Case f: 3 prefills, assistant prefix, 12 greedy ids and the <|spk|> hidden state, while 2 other sessions
    prefill and decode in the same forward passes. Both projection paths of the model (oneDNN-prepacked
    weights, the CPU default, and F.linear, the GPU path)."""
    model = model if prepack else plain_model
    case = golden.cases["f_streaming_session"]
    n_new = len(golden["f.generated_ids"])
    prefix = model.embed(golden["f.assistant_prefix_ids"])
    spk_position = case["spk_bound_in_prefix"][0]
    mates = {
        f"mate{i}": [
            embed_text(model, tok, user_turn(TEXTS[i])),
            Generate(embed_text(model, tok, ASSISTANT), GREEDY.with_(max_new_tokens=8 + i)),
        ]
        for i in range(2)
    }
    engine = make_engine(model, special)
    assert model.prepacked == prepack
    try:

        async def golden_session() -> tuple[list[int], list[GenEvent]]:
            kv_lens = []
            for i in range(len(case["prefills"])):
                kv_lens.append((await engine.prefill("f", golden[f"f.prefill{i}.inputs_embeds"])).kv_len)
            events = [
                ev async for ev in engine.generate("f", prefix, GREEDY.with_(max_new_tokens=n_new), spk_position)
            ]
            return kv_lens, events

        async def main():
            return await asyncio.gather(
                golden_session(), *(engine_run(engine, sid, turns) for sid, turns in mates.items())
            )

        (kv_lens, events), *mate_answers = asyncio.run(main())
    finally:
        engine.stop()
    assert kv_lens == [p["llm_kv_len_after"] for p in case["prefills"]]
    golden.check("f.generated_ids", torch.tensor([ev.token_id for ev in events]))
    golden.check("f.spk_hidden", events[0].spk_hidden[None])
    assert all(ev.spk_hidden is None for ev in events[1:])
    assert events[-1].finish_reason == "length" and events[-1].kv_len == case["llm_kv_len_final"]
    for (sid, turns), answers in zip(mates.items(), mate_answers):
        assert answers == solo_run(model, turns, special.stop_ids), sid


def test_eight_concurrent_sessions_equal_their_solo_runs(model, tok, special):
    """Different prompt lengths, staggered arrivals (each session starts once the previous one is answering),
    two turns each; greedy and seeded-sampling sessions mixed."""
    sessions: dict[str, list[Turn]] = {}
    prefix = embed_text(model, tok, ASSISTANT)
    spk_position = tok.encode(ASSISTANT).index(special.spk)
    for i, text in enumerate(TEXTS):
        params = GREEDY if i % 2 == 0 else SamplingParams(seed=1000 + i, max_new_tokens=10)
        sessions[f"s{i}"] = [
            embed_text(model, tok, user_turn(text * (1 + i % 3))),
            Generate(prefix, params.with_(max_new_tokens=6 + i), spk_position),
            embed_text(model, tok, user_turn(TEXTS[(i + 3) % len(TEXTS)], after=NEXT_TURN)),
            Generate(prefix, params.with_(max_new_tokens=5)),
        ]
    engine = make_engine(model, special)
    try:

        async def main():
            started = [asyncio.Event() for _ in sessions]

            async def run(i: int, sid: str, turns: list[Turn]):
                if i:
                    await started[i - 1].wait()
                return await engine_run(engine, sid, turns, started[i])

            return await asyncio.gather(*(run(i, sid, t) for i, (sid, t) in enumerate(sessions.items())))

        results = asyncio.run(main())
        stats = engine.stats()
    finally:
        engine.stop()
    for (sid, turns), answers in zip(sessions.items(), results):
        assert answers == solo_run(model, turns, special.stop_ids), sid
    assert stats["mixed_steps"] > 0  # prefills really shared forward passes with decodes
    assert stats["sessions"] == len(sessions) and stats["active"] == 0 and stats["queue_depth"] == 0


def test_interrupt_stops_the_answer_and_the_next_turn_continues_like_solo(model, tok, special):
    prompt = embed_text(model, tok, user_turn(TEXTS[1]))
    prefix = embed_text(model, tok, ASSISTANT)
    next_turn = embed_text(model, tok, user_turn(TEXTS[2], after=AFTER_INTERRUPT))
    # no stop ids: the answer can only end by the interrupt
    engine = make_engine(model, special, stop_ids=())
    try:

        async def main():
            await engine.prefill("s", prompt)
            events = []
            async for ev in engine.generate("s", prefix, GREEDY.with_(max_new_tokens=1000)):
                events.append(ev)
                if len(events) == 3:
                    assert engine.interrupt("s")
            assert not engine.interrupt("s")  # nothing left to interrupt
            await engine.prefill("s", next_turn)
            again = [ev.token_id async for ev in engine.generate("s", prefix, GREEDY.with_(max_new_tokens=6))]
            return events, again

        events, again = asyncio.run(main())
        kv_final = engine.kv_len("s")
    finally:
        engine.stop()
    *tokens, last = events
    assert last.token_id is None and last.finish_reason == "interrupted"
    ids = [ev.token_id for ev in tokens]
    assert len(ids) >= 3 and all(ev.finish_reason is None for ev in tokens)
    # the KV holds prompt + prefix + every emitted id but the last (never fed back), as upstream
    assert last.kv_len == len(prompt) + len(prefix) + len(ids) - 1
    solo = model.new_cache()
    model.step(torch.cat([prompt, prefix, model.embed(torch.tensor(ids[:-1]))]), solo)
    model.step(next_turn, solo)
    expected = generate_solo(model, prefix, GREEDY.with_(max_new_tokens=6), (), cache=solo)
    assert again == expected.ids
    assert kv_final == solo.get_seq_length()


def test_leaving_the_stream_early_interrupts_the_answer(model, tok, special):
    engine = make_engine(model, special, stop_ids=())
    try:

        async def main():
            await engine.prefill("s", embed_text(model, tok, user_turn(TEXTS[0])))
            stream = engine.generate("s", embed_text(model, tok, ASSISTANT), GREEDY.with_(max_new_tokens=10_000))
            await anext(stream)
            await stream.aclose()
            # the engine lets go of the answer; a new prefill to the session runs
            return await engine.prefill("s", embed_text(model, tok, NEXT_TURN))

        asyncio.run(main())
        stats = engine.stats()
    finally:
        engine.stop()
    assert stats["active"] == 0 and stats["queue_depth"] == 0


def test_drop_frees_kv_and_fails_running_work(model, tok, special):
    engine = make_engine(model, special, stop_ids=())
    try:

        async def main():
            await engine.prefill("idle", embed_text(model, tok, user_turn(TEXTS[3])))
            await engine.prefill("busy", embed_text(model, tok, user_turn(TEXTS[4])))
            assert engine.has_session("idle") and engine.kv_len("idle") > 0
            assert engine.drop("idle") and not engine.has_session("idle") and engine.kv_len("idle") is None
            assert not engine.drop("idle")
            with pytest.raises(SessionDroppedError):
                async for _ in engine.generate("busy", embed_text(model, tok, ASSISTANT), GREEDY.with_(max_new_tokens=10_000)):
                    engine.drop("busy")

        asyncio.run(main())
        stats = engine.stats()
    finally:
        engine.stop()
    assert stats["sessions"] == 0 and stats["kv_tokens_used"] == 0 and stats["kv_tokens_reserved"] == 0


@pytest.mark.parametrize("evict_idle", [False, True])
def test_kv_budget_exhaustion_refuses_or_evicts_idle_sessions(model, tok, special, evict_idle):
    evicted: list[str] = []
    budget = 64
    engine = make_engine(
        model, special, kv_budget_tokens=budget, block_size=16, evict_idle=evict_idle, on_evict=evicted.append
    )
    first = embed_text(model, tok, user_turn(TEXTS[4]))
    second = embed_text(model, tok, user_turn(TEXTS[6]))
    assert len(first) + len(second) > budget and max(len(first), len(second)) <= budget
    try:

        async def main():
            await engine.prefill("a", first)
            if not evict_idle:
                with pytest.raises(EngineFullError, match="KV arena full"):
                    await engine.prefill("b", second)
                assert engine.kv_len("a") == len(first) and not engine.has_session("b")
                return
            assert (await engine.prefill("b", second)).kv_len == len(second)
            assert not engine.has_session("a")
            # the caller still believes "a" has its tokens: it is told to rebuild
            with pytest.raises(SessionStateError, match="rebuild"):
                await engine.prefill("a", second, expected_kv_len=len(first))

        asyncio.run(main())
        stats = engine.stats()
    finally:
        engine.stop()
    assert evicted == (["a"] if evict_idle else []) and stats["evictions"] == len(evicted)


def test_rebuild_from_replay_gives_the_identical_continuation(model, tok, special):
    """Replaying what entered the KV (prefills, then the answer's prefix and its ids but the last) into a fresh
    session reproduces the session: same KV length, same greedy next answer."""
    prompt = embed_text(model, tok, user_turn(TEXTS[7]))
    prefix = embed_text(model, tok, ASSISTANT)
    follow_up = embed_text(model, tok, user_turn(TEXTS[0], after=NEXT_TURN))
    engine = make_engine(model, special)
    try:

        async def main():
            await engine.prefill("orig", prompt, expected_kv_len=0)
            events = [ev async for ev in engine.generate("orig", prefix, GREEDY.with_(max_new_tokens=8))]
            ids = [ev.token_id for ev in events]
            kv = engine.kv_len("orig")
            assert kv == events[-1].kv_len
            # replay log: the prompt, then prefix + ids[:-1], checked against the recorded length
            await engine.prefill("copy", prompt, expected_kv_len=0)
            replayed = torch.cat([prefix, model.embed(torch.tensor(ids[:-1]))])
            assert (await engine.prefill("copy", replayed, expected_kv_len=len(prompt))).kv_len == kv
            answers = {}
            for sid in ("orig", "copy"):
                await engine.prefill(sid, follow_up, expected_kv_len=kv)
                answers[sid] = [ev.token_id async for ev in engine.generate(sid, prefix, GREEDY.with_(max_new_tokens=8))]
            return answers

        answers = asyncio.run(main())
    finally:
        engine.stop()
    assert answers["copy"] == answers["orig"]


def test_bad_input_is_rejected_before_it_reaches_the_engine(model, tok, special):
    engine = make_engine(model, special)
    try:

        async def main():
            with pytest.raises(EngineInputError, match="inputs_embeds must be"):
                await engine.prefill("s", torch.zeros(3, model.hidden_size + 1))
            with pytest.raises(EngineInputError, match="spk_position"):
                async for _ in engine.generate("s", torch.zeros(2, model.hidden_size), GREEDY, spk_position=5):
                    pass
            assert not engine.has_session("s")

        asyncio.run(main())
    finally:
        engine.stop()


def test_stopping_the_engine_fails_running_answers(model, tok, special):
    engine = make_engine(model, special, stop_ids=())

    async def main():
        await engine.prefill("s", embed_text(model, tok, user_turn(TEXTS[0])))
        with pytest.raises(RuntimeError, match="engine stopped"):
            async for _ in engine.generate("s", embed_text(model, tok, ASSISTANT), GREEDY.with_(max_new_tokens=10_000)):
                engine.stop()

    asyncio.run(main())


def test_a_non_finite_row_fails_only_its_own_request(model, tok, special):
    """A session whose assistant prefix carries a NaN row (what a broken encoder output would bring) fails with
    NonFiniteScoresError (INTERNAL) in the middle of three innocent sessions' answers, which equal their solo runs;
    its KV keeps the length it had. A prefill of such rows fails the same way."""
    prefix = embed_text(model, tok, ASSISTANT)
    poisoned = prefix.clone()
    poisoned[3, :7] = float("nan")
    innocent = {
        f"ok{i}": [
            embed_text(model, tok, user_turn(TEXTS[i])),
            Generate(prefix, (GREEDY if i % 2 else SamplingParams(seed=i)).with_(max_new_tokens=12)),
        ]
        for i in range(3)
    }
    prompt = embed_text(model, tok, user_turn(TEXTS[5]))
    engine = make_engine(model, special, stop_ids=())
    try:

        async def broken(answering: asyncio.Event) -> Exception:
            await engine.prefill("bad", prompt)
            await answering.wait()  # the innocent sessions are decoding: the bad row shares their steps
            with pytest.raises(NonFiniteScoresError) as err:
                async for _ in engine.generate("bad", poisoned, GREEDY.with_(max_new_tokens=50)):
                    pass
            return err.value

        async def main():
            answering = asyncio.Event()
            runs = [engine_run(engine, sid, turns, answering) for sid, turns in innocent.items()]
            error, *answers = await asyncio.gather(broken(answering), *runs)
            with pytest.raises(NonFiniteScoresError, match="non-finite hidden states"):
                await engine.prefill("bad-prefill", poisoned)
            return error, answers

        error, answers = asyncio.run(main())
        bad_kv = engine.kv_len("bad")
    finally:
        engine.stop()
    assert isinstance(error, Internal) and "non-finite scores" in str(error) and "'bad'" in str(error)
    assert bad_kv == len(prompt)
    for (sid, turns), got in zip(innocent.items(), answers):
        assert got == solo_run(model, turns, ()), sid


def test_replace_session_switches_to_a_context_built_beside_it(model, tok, special):
    """The lead's trim/rebuild switch: build the new context under another id, then swap it in atomically."""
    long = embed_text(model, tok, user_turn(TEXTS[4] + TEXTS[6]))
    trimmed = embed_text(model, tok, user_turn(TEXTS[6]))
    prefix = embed_text(model, tok, ASSISTANT)
    engine = make_engine(model, special, stop_ids=(), block_size=16)
    try:

        async def main():
            await engine.prefill("live", long)
            await engine.prefill("live~rebuilt", trimmed)
            assert engine.replace_session("live", "live~rebuilt") == len(trimmed)
            assert not engine.has_session("live~rebuilt") and engine.kv_len("live") == len(trimmed)
            stats = engine.stats()
            ids = [ev.token_id async for ev in engine.generate("live", prefix, GREEDY.with_(max_new_tokens=8))]
            stream = engine.generate("live", prefix, GREEDY.with_(max_new_tokens=10_000))
            await anext(stream)
            with pytest.raises(SessionBusyError):
                engine.replace_session("other", "live")
            await stream.aclose()
            with pytest.raises(SessionStateError, match="no KV"):
                engine.replace_session("live", "ghost")
            return stats, ids

        stats, ids = asyncio.run(main())
    finally:
        engine.stop()
    assert ids == solo_run(model, [trimmed, Generate(prefix, GREEDY.with_(max_new_tokens=8))], ())[0]
    reserved = -(-len(long) // 16) * 16  # "live" keeps its run: the rebuilt rows were copied into it
    assert stats["sessions"] == 1 and stats["kv_tokens_used"] == len(trimmed)
    assert stats["kv_tokens_reserved"] == reserved and stats["kv_tokens_free"] == stats["kv_tokens_budget"] - reserved


def test_sessions_moving_in_a_tight_arena_still_equal_their_solo_runs(model, tok, special):
    """Eight sessions growing side by side in an arena with little room: runs blocked by a neighbour move (or the
    arena compacts) between steps, and every answer still equals its solo run."""
    prefix = embed_text(model, tok, ASSISTANT)
    sessions = {
        f"s{i}": [
            embed_text(model, tok, user_turn(TEXTS[i])),
            Generate(prefix, GREEDY.with_(max_new_tokens=10 + i)),
            embed_text(model, tok, user_turn(TEXTS[(i + 3) % len(TEXTS)], after=NEXT_TURN)),
            Generate(prefix, SamplingParams(seed=i, max_new_tokens=6)),
        ]
        for i in range(8)
    }
    engine = make_engine(model, special, stop_ids=(), kv_budget_tokens=16 * 48, block_size=16, evict_idle=False)
    try:

        async def main():
            return await asyncio.gather(*(engine_run(engine, sid, turns) for sid, turns in sessions.items()))

        results = asyncio.run(main())
        stats = engine.stats()
    finally:
        engine.stop()
    assert stats["kv_moves"] > 0 and stats["evictions"] == 0
    for (sid, turns), answers in zip(sessions.items(), results):
        assert answers == solo_run(model, turns, ()), sid


def test_numerics_canary_catches_bad_weights(golden, special):
    model = load_llm_model(golden.checkpoint)  # its own copy: the test damages it
    engine = make_engine(model, special)
    try:
        engine.check_numerics()
        with torch.no_grad():
            model.norm.weight.mul_(1.5)
            with pytest.raises(NumericsCheckError, match="moved"):
                engine.check_numerics()
            model.norm.weight[0] = float("nan")
            with pytest.raises(NumericsCheckError, match="not finite"):
                engine.check_numerics()
    finally:
        engine.stop()

