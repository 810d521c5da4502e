"""`minicpmo bench gpu`: the real config's dimensions with random bf16 weights on one GPU, through the in-process
pipeline (`services.app.bench.InProcessPath`: the deployed pipeline minus its transport, sessions in a real
Redis, LLMCore with the KV budget and batch size of deploy/single-gpu-node.yaml). Never part of the tests.

`--configs` picks the dimensions: `real` (the default; the shared CLI default `tiny,small` counts as not given)
needs CUDA and writes a ~17 GB random checkpoint once into .run/real-dims-checkpoint (drawn on the GPU);
`small` runs the same code at `small_config()` dims, also on CPU, to check the code path.

Rows:
- `checkpoint`: seconds to get the checkpoint (under one when it was already there), its size;
- `load`: seconds to build every stage (weights, KV arena, CUDA graph capture), peak memory meanwhile;
- `sessions`, one row per count (1, 8, 32, 64; --quick: 1, 8), each on fresh sessions:
  - `unit_*`: unit latency with that many live sessions paced in real time (`paced`: 200 ms audio pieces and
    a frame each second, as the product promises), no answers meanwhile (the run is shorter than
    ANSWER_EVERY units); the latency of the AppendUnit call that completed a unit (encoders + prefill);
  - `ttfa_*`: every session appends a unit, then `speakers` of them (all, up to the TTS's SPEAKERS utterance
    slots) ask a spoken answer of 24 tokens at once; time from each Respond call to its first audio. The stream
    is closed there, as by a caller that hangs up (the answer ends as interrupted): random weights seldom speak
    an end, so each utterance would run on to the TTS's code cap (~40 s of audio);
  - `decode_tok_s`: every session appends a unit, then all ask a greedy text answer of a fixed length
    (min_new_tokens = max_new_tokens) at once: tokens after each first one over the time from the earliest
    first token to the latest end; `decode_tok_s_session`: the median session's own rate;
  - peak memory of that count's runs (CUDA: allocated and reserved by torch; CPU: the process's peak RSS).
A count that fails or runs past PHASE_TIMEOUT_S gives a row with its error, and the larger counts are skipped.
"""

from __future__ import annotations

import asyncio
import json
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protos.minicpmo.v1 import omni_pb2
from services.app.bench import (
    ANSWER_EVERY,
    InProcessPath,
    paced,
    speech_options,
    stats_ms,
    unit_inputs,
    unit_request,
)

SESSIONS = (1, 8, 32, 64)
QUICK_SESSIONS = (1, 8)
UNITS = ANSWER_EVERY - 1  # paced() answers every ANSWER_EVERY units: one fewer keeps the unit run answer-free
SPOKEN_TOKENS = 24
DECODE_TOKENS, QUICK_DECODE_TOKENS = 128, 32
SPEAKERS = 32  # the TTSDecoder's utterance slots per replica: one more concurrent utterance is refused
PHASE_TIMEOUT_S = 180.0  # per session count: a stuck run must not eat a GPU lease
GPU_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "single-gpu-node.yaml"
GIB = 2**30


def dims_of(configs: str) -> str:
    names = {c.strip() for c in configs.split(",") if c.strip()}
    if names == {"small"}:
        return "small"
    if names in ({"real"}, {"tiny", "small"}):  # `tiny,small` is what every stage gets without --configs
        return "real"
    raise SystemExit(f"bench gpu: --configs is `real` (default) or `small`, not {configs!r}")


def require_device(dims: str, device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"bench gpu: --device {device} but torch sees no CUDA device")
    if dims == "real" and not device.startswith("cuda"):
        raise SystemExit(
            "bench gpu: the real dims (~8.7 B parameters, ~17 GB in bf16) need a CUDA device (--device cuda); "
            "`--configs small` runs the same benchmark at the small config's dims, on CPU too"
        )


def llm_kwargs(device: str) -> dict[str, Any]:
    """LLMCore's init_kwargs of the one-GPU deploy config on CUDA; the deployment's defaults on CPU (that KV
    budget would not fit a CPU machine's memory)."""
    if not device.startswith("cuda"):
        return {}
    import yaml

    app = yaml.safe_load(GPU_CONFIG.read_text())["applications"][0]
    return app["args"]["deployments"]["LLMCore"]["init_kwargs"]


def memory(device: str) -> dict[str, float]:
    """Peak memory since the last `reset_peak(device)`."""
    if device.startswith("cuda"):
        return {"peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}  # fmt: skip
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # ru_maxrss is in KiB


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def report(row: dict[str, Any]) -> dict[str, Any]:
    """Print a row as soon as it is measured: a run cut short still shows what it got."""
    print(f"bench gpu: {json.dumps(row)}", file=sys.stderr, flush=True)
    return row


def text_options(n: int) -> omni_pb2.GenerationOptions:
    opts = omni_pb2.GenerationOptions(max_new_tokens=n, min_new_tokens=n)
    opts.sampling.greedy = True
    return opts


# --- scenarios (on sessions that already exist) ---------------------------------------------------------------


async def append_all(path, sids: list[str], frame: bytes, pcm: np.ndarray) -> None:
    await asyncio.gather(*(path.append(s, unit_request(s, frame, pcm)) for s in sids))


async def audio_started(path, sid: str) -> float:
    """Seconds from Respond to the first audio of a spoken answer; the stream is closed there (module doc)."""
    t0 = time.perf_counter()
    stream = path.respond(sid, speech_options(SPOKEN_TOKENS))
    try:
        async for ev in stream:
            if ev.WhichOneof("event") == "audio":
                return time.perf_counter() - t0
    finally:
        await stream.aclose()
    raise RuntimeError(f"session {sid}: the spoken answer ended without audio")


async def spoken(path, sids: list[str], frame: bytes, pcm: np.ndarray) -> list[float]:
    """Time to first audio of the spoken answers of up to SPEAKERS sessions, asked at once after every session
    appended a unit (one wave: no utterance waits for a slot that a closed one frees in the background)."""
    await append_all(path, sids, frame, pcm)
    return list(await asyncio.gather(*(audio_started(path, s) for s in sids[:SPEAKERS])))


async def text_answer(path, sid: str, tokens: int) -> tuple[float, float, int]:
    """(first token, end) on this clock, and the tokens, of one text answer (the gateway's own timings)."""
    t0 = time.perf_counter()
    final = None
    async for ev in path.respond(sid, text_options(tokens)):
        if ev.WhichOneof("event") == "final":
            final = ev.final
    if final is None:
        raise RuntimeError(f"session {sid}: the answer ended without its final event")
    t = final.timings
    return t0 + t.time_to_first_token_ms / 1000, t0 + t.total_ms / 1000, final.usage.completion_tokens


async def decode(path, sids: list[str], frame: bytes, pcm: np.ndarray, tokens: int) -> dict[str, float]:
    """Aggregate and per-session decode rates of fixed-length text answers, all asked at once."""
    await append_all(path, sids, frame, pcm)
    answers = await asyncio.gather(*(text_answer(path, s, tokens) for s in sids))
    decoded = [n - 1 for _, _, n in answers]  # the first token comes from the prefill
    span = max(end for _, end, _ in answers) - min(first for first, _, _ in answers)
    own = [d / (end - first) for d, (first, end, _) in zip(decoded, answers, strict=True) if end > first]
    return {"decode_tok_s": sum(decoded) / span if span > 0 else float("nan"),
            "decode_tok_s_session": statistics.median(own) if own else float("nan")}  # fmt: skip


async def sessions_row(path, n: int, frame: bytes, pcm: np.ndarray, tokens: int) -> dict[str, Any]:
    unit = stats_ms((await paced(path, frame, pcm, n, UNITS))[0])  # answer-free: nothing refused
    sids = list(await asyncio.gather(*(path.create() for _ in range(n))))
    try:
        ttfa = stats_ms(await spoken(path, sids, frame, pcm))
        rates = await decode(path, sids, frame, pcm, tokens)
    finally:
        await asyncio.gather(*(path.close_session(s) for s in sids))
    return {"unit_p50_ms": unit["p50_ms"], "unit_p95_ms": unit["p95_ms"], "speakers": ttfa["n"],
            "ttfa_p50_ms": ttfa["p50_ms"], "ttfa_p95_ms": ttfa["p95_ms"], **rates}  # fmt: skip


async def warm_up(path, frame: bytes, pcm: np.ndarray) -> None:
    """One session through every stage once, so first-call costs stay out of the rows."""
    sid = await path.create()
    await spoken(path, [sid], frame, pcm)
    await decode(path, [sid], frame, pcm, 8)
    await path.close_session(sid)


async def measure(path, dims: str, device: str, quick: bool) -> list[dict[str, Any]]:
    frame, pcm = unit_inputs()
    tokens = QUICK_DECODE_TOKENS if quick else DECODE_TOKENS
    rows: list[dict[str, Any]] = []
    try:
        await warm_up(path, frame, pcm)
        for n in QUICK_SESSIONS if quick else SESSIONS:
            row = {"dims": dims, "phase": "sessions", "sessions": n}
            reset_peak(device)
            t0 = time.perf_counter()
            try:
                row |= await asyncio.wait_for(sessions_row(path, n, frame, pcm, tokens), PHASE_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 (any failure: keep the rows so far; larger counts would fail too)
                traceback.print_exc()
                rows.append(report({**row, "error": f"{type(e).__name__}: {e}"}))
                break
            rows.append(report({**row, "seconds": time.perf_counter() - t0, **memory(device)}))
    finally:
        await path.aclose()
    return rows


# --- entry point ----------------------------------------------------------------------------------------------


def checkpoint_row(dims: str, device: str) -> tuple[Path, dict[str, Any]]:
    from services.common.bench_checkpoints import real_dims_checkpoint, small_checkpoint
    from services.common.checkpoint import INDEX_FILE

    t0 = time.perf_counter()
    model_dir = real_dims_checkpoint(device) if dims == "real" else small_checkpoint()
    seconds = time.perf_counter() - t0
    total = json.loads((model_dir / INDEX_FILE).read_text())["metadata"]["total_size"]
    return model_dir, report({"dims": dims, "phase": "checkpoint", "seconds": seconds, "size_gib": total / GIB})


def run(args) -> list[dict[str, Any]]:
    from services.app.redis_server import RedisServer

    dims = dims_of(args.configs)
    require_device(dims, args.device)
    model_dir, row = checkpoint_row(dims, args.device)
    rows = [row]
    with RedisServer() as redis:
        redis.start()
        reset_peak(args.device)
        t0 = time.perf_counter()
        path = InProcessPath(str(model_dir), args.device, redis.url, **llm_kwargs(args.device))
        try:
            load = {"dims": dims, "phase": "load", "seconds": time.perf_counter() - t0, **memory(args.device)}
            rows.append(report(load))
            rows += asyncio.run(measure(path, dims, args.device, args.quick))
        finally:
            path.shutdown()
    return rows
