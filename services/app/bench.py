"""`minicpmo bench pipeline`: live sessions through the Ray Serve deployments vs the same driver and stages in
one process (`services.app.local`: the deployed pipeline minus its transport), on the tiny and small configs.

Rows per config and path ("deployments": gRPC through the proxy, the Gateway and every deployment;
"in-process": the live-session driver over the stages in this process; both keep sessions in a real Redis):
- `unit`: latency of one 1 s live unit (a frame + 1 s of audio in one AppendUnit -> encoders -> prefill);
- `ttfa`: time to first audio of a spoken answer;
- `throughput`: 1, 8 and 32 sessions each pushing 1 s units back to back: units/s in all, unit latency;
- `capacity`: real-time live sessions (200 ms audio pieces paced in real time, a frame each second, a spoken
  answer every 5 units): the most sessions whose unit latency p95 stays under 1 s and which all found room
  (none refused with RESOURCE_EXHAUSTED: LLMCore admits the config's ADMITTED_SESSIONS, the TTS has a fixed number
  of speech slots), found by doubling then bisecting; `unit_p95_ms` is that of the largest passing count;
- `cpu_per_unit` (deployments): CPU seconds each stage's replica processes spent per unit in the throughput run.
A unit's latency in the paced runs is from the AppendUnit that completed its second to that call's reply.
Both paths run at once (one Redis, their own sessions): the `unit` and `ttfa` rows alternate between them in
blocks of 8 units, so that their ratio compares the two under the same machine (`unit_ratio`: the median over the
pairs of blocks of deployed / in-process unit p50); the load rows run one path at a time while the other sits idle.
"""

from __future__ import annotations

import asyncio
import io
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from protos.minicpmo.v1 import omni_pb2
from services.app.serve_env import use_local_cluster_env

APP = "minicpmo-bench"
CONCURRENCY = (1, 8, 32)
# The sessions here are short (the longest ~40 units, ~3600 tokens): a 4096-token limit never rolls them, and lets
# LLMCore's KV arena promise each its whole limit (admission) for up to ADMITTED_SESSIONS at once. More are refused
# at CreateSession and count as refused in the capacity search, which therefore reports at most that many. Both paths
# hold their arena at once: small's 28 KiB of KV per token would make 64 sessions 7.3 GB per path, and the two paths
# beside their replicas outgrew this 24 GiB box (Ray's memory monitor killed replicas), so small admits 32 (the most
# sessions a load row runs).
BENCH_LIMITS = {"max_session_tokens": 4096, "context_window_tokens": 3072, "context_keep_tokens": 1536}
ADMITTED_SESSIONS = {"tiny": 64, "small": max(CONCURRENCY)}
PIECE_S = 0.2
ANSWER_EVERY = 5  # units between two spoken answers in the capacity runs
WARM_UP_UNITS = 3
CAPACITY_P95_S = 1.0
STAGE_NAMES = ("Gateway", "VisionEncoder", "AudioEncoder", "LLMCore", "TTSDecoder")


def unit_inputs() -> tuple[bytes, np.ndarray]:
    """A 448x448 camera-like frame and 1 s of speech-like 16 kHz audio (deterministic).

    The frame is a JPEG at quality 80 of a lit scene with sensor noise (~24 KB), as the web page and the SDK send
    camera frames: a PNG of uniform noise (603 KB) would put ~25x a camera frame's bytes through every hop of the
    deployed path, transport cost that no live client causes.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    scene = Image.new("RGB", (448, 448))
    draw = ImageDraw.Draw(scene)
    for y in range(448):  # a sky-to-floor gradient
        draw.line([(0, y), (447, y)], fill=(40 + y // 4, 80 + y // 6, 160 - y // 5))
    for x, y, r in rng.integers((0, 0, 20), (400, 400, 80), (12, 3)):  # objects
        draw.ellipse([x, y, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    pixels = np.asarray(scene, dtype=np.float32) + rng.normal(0, 6, (448, 448, 3))  # sensor noise
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=80)
    t = np.arange(16000) / 16000
    pcm = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(t.size)
    return buf.getvalue(), pcm.astype(np.float32)


def stats_ms(xs: list[float]) -> dict[str, float]:
    xs = sorted(x * 1000 for x in xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"p50_ms": statistics.median(xs), "p95_ms": pick(0.95), "n": len(xs)}


def speech_options(n: int) -> omni_pb2.GenerationOptions:
    opts = omni_pb2.GenerationOptions(max_new_tokens=n, min_new_tokens=n)
    opts.sampling.greedy = True
    opts.speech.enabled = True
    opts.speech.greedy = True
    return opts


def audio(pcm: np.ndarray) -> omni_pb2.Audio:
    return omni_pb2.Audio(pcm=pcm.astype("<f4").tobytes(), sample_rate=16000)


# --- the two paths: one async client interface ------------------------------------------------------------------


class DeployedPath:
    """The production app on a local Ray cluster, reached over gRPC (asyncio channel, one per path)."""

    name = "deployments"

    def __init__(self, model_dir: str, device: str, redis_url: str, limits: dict | None = None, **llm_kwargs: Any):
        """`limits`: the app's session limits (default: the app's); `llm_kwargs`: LLMCore's init_kwargs."""
        use_local_cluster_env()
        import ray
        from ray import serve
        from ray.serve.config import gRPCOptions

        from services.app.builder import GRPC_SERVICER_FUNCTIONS, build_app
        from services.app.redis_server import free_port

        port = free_port()
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        serve.start(
            http_options={"host": "127.0.0.1", "port": free_port()},
            grpc_options=gRPCOptions(port=port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
        )
        serve.run(build_app({"model_dir": model_dir, "redis_url": redis_url, "api_keys": "bench", "device": device,
                             "limits": limits or {}, "deployments": {"LLMCore": {"init_kwargs": llm_kwargs}}}),
                  name=APP, route_prefix="/")  # fmt: skip
        self.target = f"127.0.0.1:{port}"
        self.channel = None

    def _stub(self):
        import grpc

        from protos.minicpmo.v1 import omni_pb2_grpc

        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(self.target, options=[("grpc.max_receive_message_length", 64 << 20)])
        return omni_pb2_grpc.MiniCPMOStub(self.channel)

    @staticmethod
    def _md(sid: str = "") -> list[tuple[str, str]]:
        return [("x-api-key", "bench"), *([("session_id", sid)] if sid else [])]

    async def create(self) -> str:
        return (await self._stub().CreateSession(omni_pb2.CreateSessionRequest(), metadata=self._md())).session_id

    async def append(self, sid: str, req: omni_pb2.AppendUnitRequest) -> omni_pb2.AppendUnitResponse:
        return await self._stub().AppendUnit(req, metadata=self._md(sid))

    def respond(self, sid: str, opts: omni_pb2.GenerationOptions):
        return self._stub().Respond(omni_pb2.RespondRequest(session_id=sid, options=opts), metadata=self._md(sid))

    async def close_session(self, sid: str) -> None:
        await self._stub().CloseSession(omni_pb2.CloseSessionRequest(session_id=sid), metadata=self._md(sid))

    def replica_pids(self) -> dict[str, list[int]]:
        """Stage name -> PIDs of its live replicas, from the GCS actor table (`ray.util.state` would need the
        dashboard, which this cluster does not start)."""
        from ray._private import state

        pids: dict[str, list[int]] = {name: [] for name in STAGE_NAMES}
        for info in state.actors().values():
            for name in STAGE_NAMES:
                if info["State"] == "ALIVE" and f"#{name}#" in info["Name"]:
                    pids[name].append(info["Pid"])
        return pids

    async def aclose(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    def shutdown(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


class InProcessPath:
    """The live-session driver over the stages in this process (same code, no Ray, no gRPC)."""

    name = "in-process"

    def __init__(self, model_dir: str, device: str, redis_url: str, limits: dict | None = None, **llm_kwargs: Any):
        """As `DeployedPath`'s."""
        from services.app.builder import llm_session_kwargs
        from services.app.local import LocalStages
        from services.gateway.auth import key_hash
        from services.gateway.context import GatewayContext
        from services.gateway.live import LiveSessions
        from services.gateway.requests import Limits
        from services.gateway.sessions import SessionRecords

        app_limits = Limits(**(limits or {}))
        self.stages = LocalStages(model_dir, device, redis_url, **llm_session_kwargs(app_limits), **llm_kwargs)
        ctx = GatewayContext.from_model_dir(model_dir, self.stages, app_limits)
        self.records = SessionRecords.from_url(redis_url)
        self.live = LiveSessions(ctx, self.records)
        self.caller = key_hash("bench")

    async def create(self) -> str:
        return (await self.live.create(self.caller, omni_pb2.CreateSessionRequest())).session_id

    async def append(self, sid: str, req: omni_pb2.AppendUnitRequest) -> omni_pb2.AppendUnitResponse:
        return await self.live.append(self.caller, req)

    def respond(self, sid: str, opts: omni_pb2.GenerationOptions):
        return self.live.respond(self.caller, omni_pb2.RespondRequest(session_id=sid, options=opts))

    async def close_session(self, sid: str) -> None:
        await self.live.close(self.caller, sid)

    async def aclose(self) -> None:
        await self.records.aclose()

    def shutdown(self) -> None:
        self.stages.close()


# --- scenarios ------------------------------------------------------------------------------------------------


def unit_request(sid: str, frame: bytes, pcm: np.ndarray) -> omni_pb2.AppendUnitRequest:
    return omni_pb2.AppendUnitRequest(session_id=sid, audio=audio(pcm), frames=[omni_pb2.Image(data=frame)])


async def first_audio(path, sid: str, opts) -> float:
    t0 = time.perf_counter()
    first = float("nan")
    async for ev in path.respond(sid, opts):
        if ev.WhichOneof("event") == "audio" and first != first:
            first = time.perf_counter() - t0
    return first


async def unit_and_ttfa(path, frame: bytes, pcm: np.ndarray, reps: int) -> tuple[list[float], list[float]]:
    sid = await path.create()
    for _ in range(WARM_UP_UNITS):  # first calls of each replica (allocations, lazy imports) are not the steady state
        await path.append(sid, unit_request(sid, frame, pcm))
    unit, ttfa = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        await path.append(sid, unit_request(sid, frame, pcm))
        unit.append(time.perf_counter() - t0)
    for _ in range(max(2, reps // 8)):
        await path.append(sid, unit_request(sid, frame, pcm))
        ttfa.append(await first_audio(path, sid, speech_options(24)))
    await path.close_session(sid)
    return unit, ttfa


async def throughput(path, frame: bytes, pcm: np.ndarray, sessions: int, units: int) -> tuple[float, list[float]]:
    sids = [await path.create() for _ in range(sessions)]
    latencies: list[float] = []

    async def one(sid: str) -> None:
        for _ in range(units):
            t0 = time.perf_counter()
            await path.append(sid, unit_request(sid, frame, pcm))
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(s) for s in sids))
    wall = time.perf_counter() - t0
    for sid in sids:
        await path.close_session(sid)
    return sessions * units / wall, latencies


def refused_for_room(e: Exception) -> bool:
    """A call refused because the server has no room now: RESOURCE_EXHAUSTED, as the client got it (deployed) or
    as the gateway would report the exception (in process)."""
    import grpc

    from services.gateway.servicer import status_for

    code = e.code() if isinstance(e, grpc.RpcError) else status_for(e)[0]
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def paced(path, frame: bytes, pcm: np.ndarray, sessions: int, units: int) -> tuple[list[float], int]:
    """`sessions` live sessions in real time: the latencies of the AppendUnit calls that completed a unit, and
    how many sessions or spoken answers were refused for lack of room."""
    latencies: list[float] = []
    refused = 0
    piece = int(16000 * PIECE_S)

    async def one(sid: str, offset: float) -> None:
        nonlocal refused
        await asyncio.sleep(offset)  # spread the sessions' clocks over one piece
        start = time.perf_counter()
        for k in range(units * int(1 / PIECE_S)):
            due = start + k * PIECE_S
            await asyncio.sleep(max(0.0, due - time.perf_counter()))  # pacing: a live microphone
            req = omni_pb2.AppendUnitRequest(session_id=sid, audio=audio(pcm[(k % 5) * piece : (k % 5 + 1) * piece]))
            if k % 5 == 0:
                req.frames.append(omni_pb2.Image(data=frame))
            t0 = time.perf_counter()
            reply = await path.append(sid, req)
            if reply.units_prefilled:
                latencies.append(time.perf_counter() - t0)
            if reply.units_prefilled and (k + 1) % (5 * ANSWER_EVERY) == 0:
                try:
                    async for _ in path.respond(sid, speech_options(12)):
                        pass
                except Exception as e:
                    if not refused_for_room(e):
                        raise
                    refused += 1

    sids = []
    for _ in range(sessions):
        try:
            sids.append(await path.create())
        except Exception as e:  # more sessions than LLMCore admits
            if not refused_for_room(e):
                raise
            refused += 1
    await asyncio.gather(*(one(s, i * PIECE_S / sessions) for i, s in enumerate(sids)))
    for sid in sids:
        await path.close_session(sid)
    return latencies, refused


async def capacity(path, frame: bytes, pcm: np.ndarray, units: int, limit: int) -> tuple[int, dict[str, float]]:
    """The most real-time sessions with unit p95 under CAPACITY_P95_S (doubling, then bisecting)."""
    best, best_stats, n, lo, hi = 0, {}, 1, 0, None
    while n <= limit:
        latencies, refused = await paced(path, frame, pcm, n, units)
        s = stats_ms(latencies)
        if s["p95_ms"] <= CAPACITY_P95_S * 1000 and not refused:
            best, best_stats, lo = n, s, n
        else:
            hi = n
        if hi is None:
            n *= 2
        elif hi - lo <= 1:
            break
        else:
            n = (lo + hi) // 2
    return best, best_stats


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    tick = os.sysconf("SC_CLK_TCK")

    def of(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime + stime

    return {name: sum(of(p) for p in ps) for name, ps in pids.items()}


async def unit_rows(paths: list, config: str, frame: bytes, pcm: np.ndarray, quick: bool) -> list[dict[str, Any]]:
    """`unit` and `ttfa` of every path, measured in blocks that alternate between the paths (which goes first
    alternates too): this box's speed drifts by 10-40% over minutes, and a ratio of two runs minutes apart measured
    that drift as much as the transport. `unit_ratio`: deployed over in-process unit p50 within each pair of blocks,
    its median over the pairs (with their range); one median over all units had read 1.12-1.36x in runs of one day."""
    reps, blocks = (4, 1) if quick else (8, 8)
    measured: dict[str, tuple[list[float], list[float]]] = {path.name: ([], []) for path in paths}
    ratios = []
    for block in range(blocks):
        p50: dict[str, float] = {}
        for path in paths if block % 2 == 0 else paths[::-1]:
            unit, ttfa = await unit_and_ttfa(path, frame, pcm, reps)
            measured[path.name][0].extend(unit)
            measured[path.name][1].extend(ttfa)
            p50[path.name] = statistics.median(unit)
        ratios.append(p50[DeployedPath.name] / p50[InProcessPath.name])
    rows = [{"config": config, "path": name, "metric": metric, **stats_ms(xs)}
            for name, (unit, ttfa) in measured.items() for metric, xs in (("unit", unit), ("ttfa", ttfa))]  # fmt: skip
    rows.append({"config": config, "path": DeployedPath.name, "metric": "unit_ratio", "n": blocks,
                 "vs_in_process": statistics.median(ratios), "min": min(ratios), "max": max(ratios)})  # fmt: skip
    return rows


async def load_rows(path, config: str, frame: bytes, pcm: np.ndarray, quick: bool) -> list[dict[str, Any]]:
    """`throughput`, `cpu_per_unit` (deployed) and `capacity` of one path."""
    units = 2 if quick else 4
    row = {"config": config, "path": path.name}
    rows = []
    for n in CONCURRENCY:
        before = cpu_seconds(path.replica_pids()) if isinstance(path, DeployedPath) else None
        ups, lat = await throughput(path, frame, pcm, n, units)
        rows.append({**row, "metric": "throughput", "sessions": n, "units_per_s": ups, **stats_ms(lat)})
        if before is not None and n == CONCURRENCY[-1]:
            after = cpu_seconds(path.replica_pids())
            per_unit = {f"cpu_ms_{k}": (after[k] - before[k]) * 1000 / (n * units) for k in STAGE_NAMES}
            rows.append({**row, "metric": "cpu_per_unit", "sessions": n, **per_unit})
    best, s = await capacity(path, frame, pcm, units=3 if quick else 6, limit=16 if quick else 128)
    rows.append({**row, "metric": "capacity", "sessions": best, **{k: v for k, v in s.items() if k != "n"}})
    return rows


def run(args) -> list[dict[str, Any]]:
    from services.app.redis_server import RedisServer
    from services.common.bench_checkpoints import small_checkpoint, tiny_checkpoint

    from services.llm_core.admission import AdmissionPolicy
    from services.llm_core.context_window import WindowPolicy

    window = WindowPolicy(BENCH_LIMITS["context_window_tokens"], BENCH_LIMITS["context_keep_tokens"])
    frame, pcm = unit_inputs()
    rows: list[dict[str, Any]] = []
    for config in [c.strip() for c in args.configs.split(",") if c.strip()]:
        model_dir = str({"tiny": tiny_checkpoint, "small": small_checkpoint}[config]())
        kv_budget = AdmissionPolicy.kv_budget_for(ADMITTED_SESSIONS[config], BENCH_LIMITS["max_session_tokens"], window)
        with RedisServer() as redis:  # both paths at once (their sessions apart), so their unit rows interleave
            redis.start()
            paths = []
            try:
                for make in (InProcessPath, DeployedPath):
                    paths.append(make(model_dir, args.device, redis.url, BENCH_LIMITS, kv_budget_tokens=kv_budget))
                rows += asyncio.run(_measured(paths, config, frame, pcm, args.quick))
            finally:
                for path in paths:
                    path.shutdown()
        print_targets([r for r in rows if r["config"] == config])
    return rows


def print_targets(rows: list[dict[str, Any]]) -> None:
    """The transport's targets: deployed unit latency <= 1.3x in-process, throughput at the most sessions >= 0.7x."""
    ratio = next(r for r in rows if r["metric"] == "unit_ratio")
    print(f"TARGET ({ratio['config']}): deployed unit latency <= 1.3x in-process (median of {ratio['n']} interleaved "
          f"pairs of blocks, range {ratio['min']:.2f}-{ratio['max']:.2f}x): {ratio['vs_in_process']:.2f}x "
          f"{'met' if ratio['vs_in_process'] <= 1.3 else 'NOT met'}")
    most = {r["path"]: r for r in rows if r["metric"] == "throughput" and r["sessions"] == max(CONCURRENCY)}
    if len(most) == 2:
        share = most[DeployedPath.name]["units_per_s"] / most[InProcessPath.name]["units_per_s"]
        print(f"TARGET ({ratio['config']}): deployed throughput at {max(CONCURRENCY)} sessions >= 0.7x in-process: "
              f"{share:.2f}x {'met' if share >= 0.7 else 'NOT met'}")


async def _measured(paths: list, config: str, frame: bytes, pcm: np.ndarray, quick: bool) -> list[dict[str, Any]]:
    try:
        rows = await unit_rows(paths, config, frame, pcm, quick)
        for path in paths:  # the other path sits idle meanwhile
            rows += await load_rows(path, config, frame, pcm, quick)
        return rows
    finally:
        for path in paths:
            await path.aclose()
