"""`minicpmo bench pipeline`: the whole pipeline through the Ray Serve deployments vs the same work in one process.

For each config (tiny: the golden/generated tiny checkpoint; small: `small_config()` dims written as a random
checkpoint into .run/small-checkpoint) it measures:
- `unit`: latency of one 1 s live unit (frame + 1 s of audio -> encoders -> prefill into the session's KV);
- `ttfa`: time to first audio of a spoken answer (assistant prefix -> tokens -> TTS -> first audio chunk);
- `throughput`: 1, 8 and 32 live sessions each pushing units back to back: units per second in all (>= the
  number of sessions means every session keeps up with real time) and the median unit latency under that load.
"deployments" rows go over gRPC through the gateway, Redis and every deployment; "in-process" rows run the same
components in this process (encoders in threads, the same batching LLM engine, no Ray, no Redis, no gRPC).

The small checkpoint uses the tiny tokenizers: its LLM keeps the real 151,700-row vocabulary (same lm_head compute)
with the rows of ids the tiny tokenizer lacks set to zero, so answers decode to text the TTS can speak; the TTS
text vocabulary is the tiny one (an embedding lookup: no compute difference).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

APP = "minicpmo-bench"
TINY_DIR = Path(".run/tiny-checkpoint")
SMALL_DIR = Path(".run/small-checkpoint")
CONCURRENCY = (1, 8, 32)


# --- inputs and checkpoints -------------------------------------------------------------------------------------


def unit_inputs(seconds: int = 1) -> tuple[bytes, np.ndarray]:
    """A 448x448 frame (PNG) and `seconds` of speech-like 16 kHz audio (deterministic)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = (rng.random((448, 448, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    t = np.arange(16000 * seconds) / 16000
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(t.size))
    return buf.getvalue(), pcm.astype(np.float32)


def tiny_checkpoint() -> str:
    golden = Path(os.environ.get("GOLDEN_DIR", "../shared/golden")) / "checkpoint"
    if (golden / "config.json").is_file():
        return str(golden.resolve())
    from services.gateway.app import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(TINY_DIR)


def small_checkpoint() -> str:
    """small_config() dims in the official layout, random weights (written once)."""
    if (SMALL_DIR / "config.json").is_file():
        return str(SMALL_DIR.resolve())
    from safetensors.torch import save_file

    from services.common.checkpoint import INDEX_FILE
    from services.common.checkpoint_layout import official_shapes
    from services.common.config import ModelConfig, small_config
    from services.common.tiny_checkpoint import random_tensor
    from services.gateway.tokenizer import load_tokenizer

    tiny = Path(tiny_checkpoint())
    tmp = SMALL_DIR.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(tiny, tmp, ignore=shutil.ignore_patterns("*.safetensors", INDEX_FILE, "config.json"))
    cfg = json.loads((tiny / "config.json").read_text())
    s = small_config()
    cfg.update({k: getattr(s.llm, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "vocab_size")})  # fmt: skip
    cfg["max_window_layers"] = s.llm.num_hidden_layers
    cfg["vision_config"].update({k: getattr(s.vision, k) for k in ("hidden_size", "intermediate_size",
                                                                   "num_hidden_layers", "num_attention_heads")})  # fmt: skip
    cfg["audio_config"].update({k: getattr(s.audio, k) for k in ("d_model", "encoder_ffn_dim", "encoder_layers",
                                                                 "encoder_attention_heads")})  # fmt: skip
    cfg["tts_config"].update({k: getattr(s.tts, k) for k in ("llm_dim", "hidden_size", "intermediate_size",
                                                             "num_attention_heads", "num_hidden_layers")})  # fmt: skip
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    n_tok = len(load_tokenizer(tmp))
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in official_shapes(ModelConfig.from_dict(cfg)).items():
        t = random_tensor(name, shape, gen)
        if name == "llm.lm_head.weight":
            t[n_tok:] = 0  # ids the tokenizer lacks never win the argmax (see module doc)
        tensors[name] = t.to(torch.bfloat16)
    shard = "model-00001-of-00001.safetensors"
    save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
    total = sum(t.numel() * 2 for t in tensors.values())
    (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": {k: shard for k in tensors}}))
    tmp.rename(SMALL_DIR)
    return str(SMALL_DIR.resolve())


def stats_ms(xs: list[float]) -> dict[str, float]:
    xs = sorted(x * 1000 for x in xs)
    return {"p50_ms": statistics.median(xs), "p90_ms": xs[min(len(xs) - 1, int(0.9 * len(xs)))], "n": len(xs)}


# --- through the deployments ------------------------------------------------------------------------------------


class Deployed:
    """The production app on a local Ray cluster + redis-server, reached over gRPC."""

    def __init__(self, model_dir: str, device: str):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray
        from ray import serve
        from ray.serve.config import gRPCOptions

        from services.gateway.app import GRPC_SERVICER_FUNCTIONS, build_app
        from services.client.cli import free_port, start_redis

        self.redis, redis_url = start_redis(Path(".run/bench-redis"))
        port = free_port()
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        serve.start(
            http_options={"host": "127.0.0.1", "port": free_port()},
            grpc_options=gRPCOptions(port=port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
        )
        serve.run(build_app({"model_dir": model_dir, "redis_url": redis_url, "api_keys": "bench",
                             "device": device}), name=APP, route_prefix="/")  # fmt: skip
        self.target = f"127.0.0.1:{port}"

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        self.redis.terminate()
        self.redis.wait(timeout=10)

    def client(self):
        from services.client.sdk import MiniCPMOClient

        return MiniCPMOClient(self.target, api_key="bench")


def _speech_opts(n: int):
    from services.client.sdk import generation_options

    return generation_options(max_new_tokens=n, min_new_tokens=n, greedy=True, speech=True, speech_greedy=True)


def deployed_unit_and_ttfa(d: Deployed, frame: bytes, pcm: np.ndarray, reps: int) -> tuple[list[float], list[float]]:
    unit, ttfa = [], []
    with d.client() as c:
        sid = c.create_session().session_id
        c.append(sid, audio=pcm, frames=[frame])  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            c.append(sid, audio=pcm, frames=[frame])
            unit.append(time.perf_counter() - t0)
        for _ in range(max(2, reps // 3)):
            c.append(sid, audio=pcm, frames=[frame])
            t0 = time.perf_counter()
            first = None
            for ev in c.respond_stream(sid, _speech_opts(24)):
                if first is None and ev.WhichOneof("event") == "audio":
                    first = time.perf_counter() - t0
            ttfa.append(first if first is not None else float("nan"))
        c.close_session(sid)
    return unit, ttfa


def deployed_throughput(d: Deployed, frame: bytes, pcm: np.ndarray, sessions: int, units: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(sessions + 1)

    def worker() -> None:
        with d.client() as c:
            sid = c.create_session().session_id
            start.wait()
            mine = []
            for _ in range(units):
                t0 = time.perf_counter()
                c.append(sid, audio=pcm, frames=[frame])
                mine.append(time.perf_counter() - t0)
            c.close_session(sid)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(sessions)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return sessions * units / (time.perf_counter() - t0), latencies


# --- the same work in one process -------------------------------------------------------------------------------


class InProcess:
    """Every component in this process; live sessions driven the way the gateway drives the deployments."""

    def __init__(self, model_dir: str, device: str):
        from services.audio_encoder.encoder import AudioEncoder
        from services.gateway.prompts import PlaceholderSettings
        from services.gateway.stage import replica_dtype
        from services.gateway.tokenizer import SpecialTokens, load_tokenizer
        from services.llm_core.engine.engine import LLMEngine
        from services.llm_core.model import load_llm_model
        from services.tts_decoder.streaming import TTSDecoder
        from services.vision_encoder.encoder import VisionEncoder
        from services.vision_encoder.processor import ImageProcessorConfig

        dtype = replica_dtype(device)
        self.tok = load_tokenizer(model_dir)
        self.sp = SpecialTokens.from_tokenizer(self.tok)
        self.settings = PlaceholderSettings.streaming(ImageProcessorConfig.from_model_dir(model_dir))
        self.vision = VisionEncoder(model_dir, device=device, dtype=dtype)
        self.audio = AudioEncoder(model_dir, device=device, dtype=dtype)
        self.model = load_llm_model(model_dir, device=device, dtype=dtype)
        self.tts = TTSDecoder(model_dir, device=device, dtype=dtype)
        self.engine = LLMEngine(self.model, 65536, 2048, stop_ids=[self.sp.im_end, self.sp.endoftext])
        self.engine.start()
        self._n = 0

    def close(self) -> None:
        self.engine.stop()

    async def new_session(self) -> tuple[str, Any, Any]:
        from services.gateway.prompts import StreamingPromptState, build_streaming_prefill, system_prompt

        self._n += 1
        sid = f"s{self._n}"
        state = StreamingPromptState()
        prompt = build_streaming_prefill(system_prompt("omni", "en"), state, self.tok, settings=self.settings)
        await self.engine.prefill(sid, self.model.embed(torch.tensor(prompt.input_ids)))
        return sid, state, self.audio.new_stream()

    async def unit(self, sid: str, state, stream, frame: bytes, pcm: np.ndarray) -> None:
        from services.gateway.prompts import AudioRef, ImageRef, Message, build_streaming_prefill

        vis = asyncio.to_thread(self.vision.encode, [frame], 1)
        aud = asyncio.to_thread(self.audio.encode_chunk, stream, pcm)
        img, emb = await asyncio.gather(vis, aud)
        size = _size(frame)
        msg = Message("user", ["<unit>", ImageRef(size), AudioRef(len(pcm))])
        prompt = build_streaming_prefill(msg, state, self.tok, settings=self.settings)
        pieces = _spread(prompt.image_bounds, img[0].embeddings) + _spread(prompt.audio_bounds, emb)
        await self.engine.prefill(sid, self.model.embed(torch.tensor(prompt.input_ids), pieces))

    async def time_to_first_audio(self, sid: str, state, n: int) -> float:
        from services.gateway.prompts import assistant_prefix
        from services.llm_core.detokenize import IncrementalDetokenizer
        from services.common.generation import GREEDY

        t0 = time.perf_counter()
        prefix = assistant_prefix(self.tok)
        state.on_generate()
        detok = IncrementalDetokenizer(self.tok, drop_ids=(self.sp.im_end, self.sp.endoftext, self.sp.tts_eos))
        utt, first = None, None
        embeds = self.model.embed(torch.tensor(prefix.input_ids))
        params = GREEDY.with_(max_new_tokens=n, min_new_tokens=n)
        async for ev in self.engine.generate(sid, embeds, params, spk_position=prefix.spk_bounds[-1][0]):
            if utt is None:
                utt = await asyncio.to_thread(self.tts.start, ev.spk_hidden.float(), True)
            delta = detok.push([ev.token_id]) if ev.token_id is not None else ""
            if delta and first is None:
                chunks = await asyncio.to_thread(self.tts.push_text, utt, delta)
                if any(c.audio is not None and c.audio.size for c in chunks):
                    first = time.perf_counter() - t0
        if first is None:
            await asyncio.to_thread(self.tts.push_text, utt, detok.finish())
            chunks = await asyncio.to_thread(self.tts.finish, utt)
            first = time.perf_counter() - t0
        state.on_generate_end(False)
        return first


def _size(frame: bytes) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(frame)).size


def _spread(bounds, rows: torch.Tensor):
    out, pos = [], 0
    for s, e in bounds:
        out.append((s, e, rows[pos : pos + e - s]))
        pos += e - s
    return out


async def in_process_unit_and_ttfa(p: InProcess, frame, pcm, reps: int) -> tuple[list[float], list[float]]:
    sid, state, stream = await p.new_session()
    await p.unit(sid, state, stream, frame, pcm)  # warm-up
    unit, ttfa = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        await p.unit(sid, state, stream, frame, pcm)
        unit.append(time.perf_counter() - t0)
    for _ in range(max(2, reps // 3)):
        await p.unit(sid, state, stream, frame, pcm)
        ttfa.append(await p.time_to_first_audio(sid, state, 24))
    p.engine.drop(sid)
    return unit, ttfa


async def in_process_throughput(p: InProcess, frame, pcm, sessions: int, units: int) -> tuple[float, list[float]]:
    ss = [await p.new_session() for _ in range(sessions)]
    latencies: list[float] = []

    async def one(s) -> None:
        for _ in range(units):
            t0 = time.perf_counter()
            await p.unit(*s, frame, pcm)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(s) for s in ss))
    wall = time.perf_counter() - t0
    for s in ss:
        p.engine.drop(s[0])
    return sessions * units / wall, latencies


# --- entry point ------------------------------------------------------------------------------------------------


def run(args) -> list[dict[str, Any]]:
    reps = 4 if args.quick else 12
    units = 2 if args.quick else 4
    frame, pcm = unit_inputs()
    rows: list[dict[str, Any]] = []
    for config in [c.strip() for c in args.configs.split(",") if c.strip()]:
        model_dir = {"tiny": tiny_checkpoint, "small": small_checkpoint}[config]()
        p = InProcess(model_dir, args.device)
        try:
            unit, ttfa = asyncio.run(in_process_unit_and_ttfa(p, frame, pcm, reps))
            rows += [{"config": config, "path": "in-process", "metric": "unit", **stats_ms(unit)},
                     {"config": config, "path": "in-process", "metric": "ttfa", **stats_ms(ttfa)}]  # fmt: skip
            for n in CONCURRENCY:
                ups, lat = asyncio.run(in_process_throughput(p, frame, pcm, n, units))
                rows.append({"config": config, "path": "in-process", "metric": "throughput", "sessions": n,
                             "units_per_s": ups, **stats_ms(lat)})  # fmt: skip
        finally:
            p.close()
        del p
        d = Deployed(model_dir, args.device)
        try:
            unit, ttfa = deployed_unit_and_ttfa(d, frame, pcm, reps)
            rows += [{"config": config, "path": "deployments", "metric": "unit", **stats_ms(unit)},
                     {"config": config, "path": "deployments", "metric": "ttfa", **stats_ms(ttfa)}]  # fmt: skip
            for n in CONCURRENCY:
                ups, lat = deployed_throughput(d, frame, pcm, n, units)
                rows.append({"config": config, "path": "deployments", "metric": "throughput", "sessions": n,
                             "units_per_s": ups, **stats_ms(lat)})  # fmt: skip
        finally:
            d.close()
    return rows
