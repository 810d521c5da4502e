"""`minicpmo bench llm`: continuous-batching decode throughput and latency of the LLM engine.

For each config (tiny = the golden checkpoint, small = `small_config()` with random weights) and each number of
concurrent sessions (1, 4, 16, 64): every session first prefills a prompt, then all answer at once; we report
aggregate decode tokens/s over all sessions, the per-session inter-token latency (time between consecutive
tokens as the asyncio caller receives them), and the speed-up over 1 session. A separate row gives the time to
prefill one 1-second live unit (~90 rows: `<unit>` + 64 image + 25 audio embeddings) into a session that
already holds a system prompt, with nobody else on the engine.

Context rows: 16 sessions that each already hold 256 / 1024 / 4096 / 8192 tokens of KV decode together: the
decode step time (wall and process CPU, ms) and aggregate tokens/s, and the ratio step(4096) / step(256), which
shows what reading every session's keys costs as contexts grow, beside the floor of that ratio here: the step at
256 plus the extra KV bytes read at this machine's streaming bandwidth (a sum over 1 GiB). Their KV rows are
written straight into the arena with random values (prefilling 16 x 8192 tokens would take about an hour on one
CPU thread; a step's cost does not depend on the values).

Answers run with no stop ids and greedy choice so every session produces exactly the same number of tokens
(random weights would otherwise stop at random); sampling cost is not part of these numbers.

The "decode_attention" column says which attention the decode rows ran: on CPU (float32) our C++ kernel
(`engine/cpu_attention.py`), else torch per session.

Threads: torch's default (every core) unless `MINICPMO_TORCH_THREADS` is set (a deployed replica uses 1 by
default, `services.runtime.replica.limit_threads`, because replicas share a node). The "threads" column records
it. A single decode step is bound by weight reads and barely gains from a second core, while a batched step is
bound by compute and does, so the batching gain grows with cores. On an oversubscribed CPU, though, several
OpenMP threads made a 16-row step up to 10x slower (every op waits at a barrier for a descheduled thread):
there, measure with MINICPMO_TORCH_THREADS=1. Each point is the median of several runs (by aggregate tokens/s;
the context rows: by step time, over rounds that interleave the contexts).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import time
from typing import Any

import torch

from services.common.bench import timed
from services.common.bench_checkpoints import tiny_checkpoint
from services.common.config import small_config
from services.common.generation import GREEDY
from services.llm_core.engine import LLMEngine
from services.llm_core.engine.cuda_graphs import KERNEL_BLOCK
from services.llm_core.engine.kv_cache import KVArena, Reservation
from services.llm_core.model import LLMModel, load_llm_model, random_llm_model

SESSION_COUNTS = (1, 4, 16, 64)
PROMPT_TOKENS = 64
SYSTEM_PROMPT_TOKENS = 80
UNIT_TOKENS = 90  # one live unit: <unit> + 64 image rows + <|audio_start|> + 25 audio rows + <|audio_end|> ...
CONTEXT_TOKENS = (256, 1024, 4096, 8192)
CONTEXT_SESSIONS = 16


def load_config(name: str, device: str) -> LLMModel:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if name == "tiny":
        return load_llm_model(tiny_checkpoint(), device=device, dtype=dtype)
    if name == "small":
        return random_llm_model(small_config(), device=device, dtype=dtype)
    raise ValueError(f"unknown bench config {name!r} (tiny, small)")


def random_embeds(model: LLMModel, n: int, gen: torch.Generator) -> torch.Tensor:
    ids = torch.randint(0, model.vocab_size, (n,), generator=gen)
    return model.embed_tokens(ids)


async def decode_run(engine: LLMEngine, model: LLMModel, sessions: int, new_tokens: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(sessions)
    sids = [f"bench-{sessions}-{i}" for i in range(sessions)]
    await asyncio.gather(*(engine.prefill(s, random_embeds(model, PROMPT_TOKENS, gen)) for s in sids))
    prefix = random_embeds(model, 11, gen)
    params = GREEDY.with_(max_new_tokens=new_tokens)
    stamps: list[list[float]] = []

    async def answer(sid: str) -> None:
        times = []
        async for _ in engine.generate(sid, prefix, params):
            times.append(time.perf_counter())
        stamps.append(times)

    steps0 = engine.stats()["steps"]
    start = time.perf_counter()
    await asyncio.gather(*(answer(s) for s in sids))
    end = time.perf_counter()
    steps = engine.stats()["steps"] - steps0
    for s in sids:
        engine.drop(s)
    # decode phase: from the moment every session had its first token to the last token
    decode_start = max(t[0] for t in stamps)
    decode_tokens = sum(sum(1 for x in t if x > decode_start) for t in stamps)
    gaps = sorted(b - a for t in stamps for a, b in itertools.pairwise(t))
    return {
        "tokens": sum(len(t) for t in stamps),
        "wall_s": end - start,
        "agg_tok_s": decode_tokens / (end - decode_start) if end > decode_start else float("nan"),
        "itl_ms_mean": 1e3 * statistics.fmean(gaps),
        "itl_ms_p50": 1e3 * gaps[len(gaps) // 2],
        "itl_ms_p95": 1e3 * gaps[min(len(gaps) - 1, int(0.95 * len(gaps)))],
        "first_token_ms": 1e3 * (statistics.fmean(t[0] for t in stamps) - start),
        "steps": steps,
    }


async def unit_prefill_ms(engine: LLMEngine, model: LLMModel, reps: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1234)
    times = []
    for i in range(reps):
        sid = f"unit-{i}"
        await engine.prefill(sid, random_embeds(model, SYSTEM_PROMPT_TOKENS, gen))
        unit = random_embeds(model, UNIT_TOKENS, gen)
        t0 = time.perf_counter()
        await engine.prefill(sid, unit)
        times.append(time.perf_counter() - t0)
        engine.drop(sid)
    return {"unit_prefill_ms": 1e3 * statistics.median(times), "unit_tokens": UNIT_TOKENS, "reps": reps}


def median_run(engine: LLMEngine, model: LLMModel, sessions: int, new_tokens: int, reps: int) -> dict[str, Any]:
    runs = sorted((asyncio.run(decode_run(engine, model, sessions, new_tokens)) for _ in range(reps)),
                  key=lambda r: r["agg_tok_s"])  # fmt: skip
    return {**runs[len(runs) // 2], "reps": reps}


def whole_blocks(tokens: int) -> int:
    """`tokens` rounded up to whole arena blocks (what a session's run of that many tokens holds)."""
    return -(-tokens // KERNEL_BLOCK) * KERNEL_BLOCK


def fill_context(engine: LLMEngine, session_id: str, tokens: int, room: int, gen: torch.Generator) -> None:
    """Give a new session `tokens` rows of random KV, straight into the arena (before the engine starts), in a run
    of `room` rows held for it, as LLMCore holds a live session's whole limit, so that its growth never moves it.
    (Packed back to back without it, the sessions were copied elsewhere in the arena as they grew past a block
    boundary: a 16-token run at 4096 tokens of context that did so took 4x as long as the others.)"""
    engine.kv.create(session_id, Reservation(room))
    engine.kv.reserve(session_id, tokens)
    engine.arena.apply(engine.kv.pop_ops())
    rows = slice(engine.kv.offset(session_id), engine.kv.offset(session_id) + tokens)
    for t in (engine.arena.k, engine.arena.v):
        t[:, :, rows] = torch.randn(t[:, :, rows].shape, generator=gen).to(t.device, t.dtype)
    engine.kv.commit(session_id, tokens)


async def context_decode(engine: LLMEngine, model: LLMModel, sids: list[str], new_tokens: int) -> dict[str, Any]:
    """Every session answers from its context; times the steps after all have their first token."""
    prefix = model.embed_tokens(torch.tensor([1]))
    params = GREEDY.with_(max_new_tokens=new_tokens)
    stamps: list[list[tuple[float, float]]] = []

    async def answer(sid: str) -> None:
        times = []
        async for _ in engine.generate(sid, prefix, params):
            times.append((time.perf_counter(), time.process_time()))
        stamps.append(times)

    await asyncio.gather(*(answer(s) for s in sids))
    wall0, cpu0 = max(t[0] for t in stamps)
    wall1, cpu1 = max(t[-1] for t in stamps)
    steps = new_tokens - 1
    return {
        "step_ms": 1e3 * (wall1 - wall0) / steps,
        "step_cpu_ms": 1e3 * (cpu1 - cpu0) / steps,
        "agg_tok_s": len(sids) * steps / (wall1 - wall0),
    }


def bench_context(model: LLMModel, head: dict[str, Any], quick: bool) -> list[dict[str, Any]]:
    """The context rows. Every context's engine is filled first, then the runs go round the contexts in turn: this
    box's speed drifts by 10-70% over minutes, and the step ratio of two contexts measured minutes apart measured that
    drift as much as the context. `step_vs_256` is the median over the rounds of the ratio within each round; single
    rounds still ranged 1.4-2.7x at 4096 here, and the median of 5 rounds 1.77-2.25x from run to run, hence 9.
    Each run's tokens join the contexts, so every session starts half of all runs' tokens short of its row's
    context: the runs then straddle it."""
    new_tokens, rounds = (8, 1) if quick else (16, 9)
    warm_up_tokens = 4
    grows = warm_up_tokens + rounds * new_tokens
    engines, sids = {}, {}
    for ctx in CONTEXT_TOKENS:
        per_session = whole_blocks(ctx + grows)
        engines[ctx] = LLMEngine(
            model, CONTEXT_SESSIONS * per_session, max_batch_tokens=1024, stop_ids=(), max_session_tokens=per_session
        )
        gen = torch.Generator().manual_seed(ctx)
        sids[ctx] = [f"ctx-{ctx}-{i}" for i in range(CONTEXT_SESSIONS)]
        for sid in sids[ctx]:
            fill_context(engines[ctx], sid, ctx - grows // 2, per_session, gen)
    runs: dict[int, list[dict[str, Any]]] = {ctx: [] for ctx in CONTEXT_TOKENS}
    try:
        for ctx, engine in engines.items():  # an idle engine's thread waits without using the CPU
            engine.start()
            asyncio.run(context_decode(engine, model, sids[ctx], warm_up_tokens))  # first-step allocations
        for _ in range(rounds):
            for ctx, engine in engines.items():
                runs[ctx].append(asyncio.run(context_decode(engine, model, sids[ctx], new_tokens)))
    finally:
        for engine in engines.values():
            engine.stop()
    rows = []
    for ctx in CONTEXT_TOKENS:
        ratios = [r["step_cpu_ms"] / base["step_cpu_ms"] for r, base in zip(runs[ctx], runs[CONTEXT_TOKENS[0]])]
        mid = {k: statistics.median(r[k] for r in runs[ctx]) for k in runs[ctx][0]}
        rows.append({**head, "sessions": CONTEXT_SESSIONS, "context_tokens": ctx, **mid,
                     "step_vs_256": statistics.median(ratios), "step_vs_256_min": min(ratios),
                     "step_vs_256_max": max(ratios), "reps": rounds})  # fmt: skip
    return rows


def bench_config(name: str, device: str, quick: bool) -> list[dict[str, Any]]:
    model = load_config(name, device)
    new_tokens = 8 if quick else 32
    reps = 1 if quick else 3
    counts = SESSION_COUNTS
    per_session = whole_blocks(PROMPT_TOKENS + 11 + new_tokens)
    engine = LLMEngine(model, kv_budget_tokens=max(counts) * per_session, max_batch_tokens=1024, stop_ids=())
    engine.start()
    rows: list[dict[str, Any]] = []
    head = {"config": name, "device": device, "threads": torch.get_num_threads(),
            "decode_attention": "cpu kernel" if engine.runner.attn.kernel else "torch"}  # fmt: skip
    try:
        asyncio.run(decode_run(engine, model, 2, 4))  # warm-up (first-call allocations)
        base = None
        for n in counts:
            r = median_run(engine, model, n, new_tokens, reps)
            base = base or r["agg_tok_s"]
            rows.append({**head, "sessions": n, **r, "speedup_vs_1": r["agg_tok_s"] / base})
        unit = asyncio.run(unit_prefill_ms(engine, model, 3 if quick else 7))
        rows.append({**head, "sessions": 1, **unit})
    finally:
        engine.stop()
    if name == "small":
        rows += bench_context(model, head, quick)
    return rows


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.device == "cpu" and os.environ.get("MINICPMO_TORCH_THREADS"):
        torch.set_num_threads(int(os.environ["MINICPMO_TORCH_THREADS"]))
    rows: list[dict[str, Any]] = []
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        rows += bench_config(name, args.device, args.quick)
    small16 = [r for r in rows if r["config"] == "small" and r.get("sessions") == 16 and "speedup_vs_1" in r]
    if small16 and args.device == "cpu":
        ok = small16[0]["speedup_vs_1"] >= 8
        print(f"TARGET (cpu, small): 16 sessions >= 8x the tokens/s of 1: {small16[0]['speedup_vs_1']:.1f}x "
              f"{'met' if ok else 'NOT met'}")
    context = {r["context_tokens"]: r for r in rows if r["config"] == "small" and "context_tokens" in r}
    if 256 in context and 4096 in context:
        long = context[4096]
        print(f"TARGET (small, 16 sessions): decode step at 4096 tokens of context <= 2x the step at 256 (CPU time, "
              f"median of {long['reps']} interleaved rounds, range {long['step_vs_256_min']:.2f}-"
              f"{long['step_vs_256_max']:.2f}x): {long['step_vs_256']:.2f}x "
              f"{'met' if long['step_vs_256'] <= 2 else 'NOT met'}")
        if args.device == "cpu":
            llm = small_config().llm
            kv_bytes = KVArena.bytes_per_token(llm.num_hidden_layers, llm.num_key_value_heads, llm.head_dim,
                                               torch.float32)  # fmt: skip
            print(kv_read_floor(context[256], long, kv_bytes))
    return rows


def read_bandwidth_gb_s(gib: int = 1) -> float:
    """GB this machine streams per CPU second, the unit of `step_cpu_ms` (best of 3 sums over `gib` GiB): with
    one thread, its streaming read bandwidth."""
    t = torch.ones(gib << 28)
    best = min(timed(t.sum, "cpu")[1] for _ in range(3))
    return t.numel() * t.element_size() / best / 1e9


def kv_read_floor(short: dict[str, Any], long: dict[str, Any], kv_bytes_per_token: int) -> str:
    """What the longer context's extra KV reads cost vs what reading those bytes costs at all on this machine:
    the step ratio's floor for an attention that reads every key once."""
    extra_bytes = CONTEXT_SESSIONS * (long["context_tokens"] - short["context_tokens"]) * kv_bytes_per_token
    extra_s = (long["step_cpu_ms"] - short["step_cpu_ms"]) / 1e3
    machine = read_bandwidth_gb_s()
    floor = 1 + extra_bytes / (machine * 1e9) / (short["step_cpu_ms"] / 1e3)
    return (f"KV reads: the {long['context_tokens']}-token step reads {extra_bytes / 1e9:.2f} GB more than the "
            f"{short['context_tokens']}-token step, at {extra_bytes / extra_s / 1e9:.1f} GB per CPU second; this "
            f"machine streams {machine:.1f} GB per CPU second ({torch.get_num_threads()} thread(s)): a step ratio "
            f"of at least {floor:.2f}x")
