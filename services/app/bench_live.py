"""`minicpmo bench live`: one live session streaming 10 simulated minutes of units through the deployed pipeline
(gRPC through the Serve proxy, the Gateway and every deployment, sessions in a real Redis).

The session gets 600 one-second units (120 with --quick), each one AppendUnit with a frame and 1 s of 16 kHz
audio, back to back (simulated time: not paced); every `ANSWER_EVERY` units it asks a short greedy text answer
so it has turns like a conversation. The tiny stack's context window (6144 tokens, keep 3072) fills after about
68 units, so the full run rolls it many times.

Rows per config:
- `minute` (one per 60 units): unit latency p50/p95 in that minute; `kv_tokens`, the session's KV tokens at its
  end (GetSession) and `kv_max`, the most any AppendUnit reply reported in it; `rss_mb_<stage>`, the resident
  memory of every stage's replicas (summed per stage); `redis_bytes`, the
  Redis memory of the session's keys at its end (`MEMORY USAGE`, exact) and `redis_max`, the most after any unit;
  `errors`, gRPC errors in it (the run goes on after one);
- `summary`: units and answers done, errors (by status code; must be 0), `kv_rolls` (times the KV shrank: the
  window rebuilt it), `kv_max` before and after the first roll against the window, the RSS growth of each
  stage from the end of minute 2 to the end and its least-squares slope over those minutes (MB per minute), the
  Redis bytes at most and after CloseSession, and the unit p95 of the first vs the last minute.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import redis

from protos.minicpmo.v1 import omni_pb2
from services.app.bench import STAGE_NAMES, DeployedPath, stats_ms, unit_inputs, unit_request

UNITS, QUICK_UNITS = 600, 120
WINDOW = 60  # units per row: one simulated minute
ANSWER_EVERY = 50
ANSWER_TOKENS = 8
BASELINE_MINUTE = 2  # RSS growth is measured from the end of this minute (warm-up and first rolls done)


class LivePath(DeployedPath):
    """The deployed path plus GetSession, which the bench reads the session's KV tokens from."""

    async def info(self, sid: str) -> omni_pb2.SessionInfo:
        return await self._stub().GetSession(omni_pb2.GetSessionRequest(session_id=sid), metadata=self._md(sid))


@dataclass
class Tally:
    """What the whole run saw: errors by status code (with the first detail of each) and KV tokens per unit."""

    errors: dict[str, int] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    answers: int = 0

    def error(self, e: grpc.aio.AioRpcError) -> None:
        code = e.code().name
        self.errors[code] = self.errors.get(code, 0) + 1
        self.details.setdefault(code, (e.details() or "")[:160])

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


@dataclass
class Window:
    """One simulated minute's samples."""

    latencies: list[float] = field(default_factory=list)
    kv_max: int = 0
    redis_max: int = 0
    errors_before: int = 0  # the run's error count when the minute began


def answer_options() -> omni_pb2.GenerationOptions:
    opts = omni_pb2.GenerationOptions(max_new_tokens=ANSWER_TOKENS, min_new_tokens=ANSWER_TOKENS)
    opts.sampling.greedy = True
    return opts  # speech stays off: the answers only give the session turns


def rss_mb(pids: dict[str, list[int]]) -> dict[str, float]:
    """Resident memory (VmRSS) of each stage's replica processes, summed per stage."""

    def of(pid: int) -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
        return 0.0

    return {f"rss_mb_{s}": sum(of(p) for p in pids.get(s, [])) for s in STAGE_NAMES}


def redis_bytes(client: redis.Redis, sid: str) -> int:
    """Redis memory of every key naming the session (SCAN, not a fixed key list: a new kind of key counts too)."""
    return sum(client.memory_usage(k, samples=0) or 0 for k in client.scan_iter(match=f"*{sid}*", count=1000))


async def one_unit(path: LivePath, sid: str, req: omni_pb2.AppendUnitRequest, tally: Tally, win: Window) -> None:
    t0 = time.perf_counter()
    try:
        reply = await path.append(sid, req)
    except grpc.aio.AioRpcError as e:
        tally.error(e)
        return
    win.latencies.append(time.perf_counter() - t0)
    tally.tokens.append(reply.token_count)
    win.kv_max = max(win.kv_max, reply.token_count)


async def answer(path: LivePath, sid: str, tally: Tally) -> None:
    try:
        async for _ in path.respond(sid, answer_options()):
            pass
        tally.answers += 1
    except grpc.aio.AioRpcError as e:
        tally.error(e)


async def minute_row(path: LivePath, sid: str, minute: int, win: Window, tally: Tally, rcli: redis.Redis) -> dict:
    try:
        info = await path.info(sid)
    except grpc.aio.AioRpcError as e:
        tally.error(e)
        info = omni_pb2.SessionInfo()
    lat = stats_ms(win.latencies) if win.latencies else {"p50_ms": float("nan"), "p95_ms": float("nan"), "n": 0}
    return {
        "row": "minute", "minute": minute, "units": info.units,
        "unit_p50_ms": lat["p50_ms"], "unit_p95_ms": lat["p95_ms"],
        "kv_tokens": info.token_count, "kv_max": win.kv_max, "kv_window": info.context_window_tokens,
        **rss_mb(path.replica_pids()),
        "redis_bytes": redis_bytes(rcli, sid), "redis_max": win.redis_max,
        "errors": tally.error_count - win.errors_before,
    }  # fmt: skip


def rss_slope(minutes: list[dict], stage: str) -> float:
    """MB per simulated minute of a stage's RSS from the baseline minute on, by least squares: a replica's RSS
    swings by several MB with its torch buffers, so a trend shows in the slope of every minute, not in the
    difference of two."""
    rows = minutes[BASELINE_MINUTE - 1 :]
    if len(rows) < 2:
        return float("nan")
    return float(np.polyfit([m["minute"] for m in rows], [m[f"rss_mb_{stage}"] for m in rows], 1)[0])


def summary(minutes: list[dict], tally: Tally, units: int, redis_after_close: int) -> dict[str, Any]:
    drops = [i for i in range(1, len(tally.tokens)) if tally.tokens[i] < tally.tokens[i - 1]]
    first_roll = drops[0] if drops else len(tally.tokens)
    base, last = minutes[min(BASELINE_MINUTE, len(minutes)) - 1], minutes[-1]
    return {
        "row": "summary", "units": units, "answers": tally.answers, "errors": tally.error_count,
        "error_status": "; ".join(f"{c} x{n}: {tally.details[c]}" for c, n in tally.errors.items()),
        "kv_rolls": len(drops), "kv_window": last["kv_window"],
        "kv_max_before_fill": max(tally.tokens[:first_roll], default=0),
        "kv_max_after_fill": max(tally.tokens[first_roll:], default=0),
        **{f"rss_growth_mb_{s}": last[f"rss_mb_{s}"] - base[f"rss_mb_{s}"] for s in STAGE_NAMES},
        **{f"rss_slope_mb_per_min_{s}": rss_slope(minutes, s) for s in STAGE_NAMES},
        "redis_max": max(m["redis_max"] for m in minutes), "redis_after_close": redis_after_close,
        "p95_first_ms": minutes[0]["unit_p95_ms"], "p95_last_ms": last["unit_p95_ms"],
    }  # fmt: skip


async def live_session(path: LivePath, rcli: redis.Redis, units: int, frame: bytes, pcm: np.ndarray) -> list[dict]:
    sid = await path.create()
    tally, win, minutes = Tally(), Window(), []
    for k in range(1, units + 1):
        await one_unit(path, sid, unit_request(sid, frame, pcm), tally, win)
        win.redis_max = max(win.redis_max, redis_bytes(rcli, sid))
        if k % ANSWER_EVERY == 0:
            await answer(path, sid, tally)
        if k % WINDOW == 0:
            minutes.append(await minute_row(path, sid, k // WINDOW, win, tally, rcli))
            win = Window(errors_before=tally.error_count)
    try:
        await path.close_session(sid)
    except grpc.aio.AioRpcError as e:
        tally.error(e)
    return [*minutes, summary(minutes, tally, units, redis_bytes(rcli, sid))]


async def _measured(path: LivePath, rcli: redis.Redis, units: int) -> list[dict]:
    frame, pcm = unit_inputs()
    try:
        return await live_session(path, rcli, units, frame, pcm)
    finally:
        await path.aclose()


def run(args) -> list[dict[str, Any]]:
    from services.app.redis_server import RedisServer
    from services.common.bench_checkpoints import small_checkpoint, tiny_checkpoint

    units = QUICK_UNITS if args.quick else UNITS
    rows: list[dict[str, Any]] = []
    for config in [c.strip() for c in args.configs.split(",") if c.strip()]:
        model_dir = str({"tiny": tiny_checkpoint, "small": small_checkpoint}[config]())
        with RedisServer() as server:
            server.start()
            rcli = redis.Redis.from_url(server.url)
            path = LivePath(model_dir, args.device, server.url)
            try:
                rows += [{"config": config, **r} for r in asyncio.run(_measured(path, rcli, units))]
            finally:
                path.shutdown()
                rcli.close()
    return rows
