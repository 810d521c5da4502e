"""`minicpmo serve`, `minicpmo chat`, `minicpmo session`: run the pipeline locally and talk to it over gRPC.

Video input: no video decoding library (PyAV, OpenCV, imageio) is installed with the project, so `--video`
takes a FOLDER of frames (one image per second of video, in name order) plus, optionally, the soundtrack as an
audio file (`--video-audio`); extract them with e.g. `ffmpeg -i in.mp4 -vf fps=1 frames/%04d.jpg` and
`ffmpeg -i in.mp4 -ac 1 -ar 16000 sound.wav`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_TARGET = "127.0.0.1:9000"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


# --- serve ----------------------------------------------------------------------------------------------------


def register_serve(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="run Redis (if needed), a local Ray cluster and every deployment; gRPC on :9000")
    p.add_argument("--model-dir", default=os.environ.get("MODEL_DIR"),
                   help="checkpoint directory (default: $MODEL_DIR, else a tiny random checkpoint)")
    p.add_argument("--redis-url", default=os.environ.get("MINICPMO_REDIS_URL"),
                   help="Redis URL (default: start a local redis-server)")
    p.add_argument("--api-keys", default=os.environ.get("MINICPMO_API_KEYS"),
                   help="comma list of accepted API keys (default: $MINICPMO_API_KEYS, else one generated key)")
    p.add_argument("--port", type=int, default=9000, help="gRPC port (default 9000)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--separate-vocoder", action="store_true", help="run DVAE + Vocos as their own deployment")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs the local Ray cluster may use")
    p.add_argument("--config", type=Path, default=Path("deploy/local-cpu.yaml"),
                   help="Ray Serve config whose app args, deployment options and gRPC options to use "
                        "(default deploy/local-cpu.yaml when present; command-line flags win)")
    p.set_defaults(func=serve_main)


def config_app_args(path: Path) -> tuple[dict, dict, dict]:
    """(build_app args, gRPC options, HTTP options) from a `serve run` config file: the first app's args, with its
    `deployments:` list folded into args["deployments"] (what `serve run` would apply on top of the app)."""
    import yaml

    cfg = yaml.safe_load(path.read_text())
    app = (cfg.get("applications") or [{}])[0]
    args = dict(app.get("args") or {})
    per = {k: dict(v) for k, v in (args.get("deployments") or {}).items()}
    for d in app.get("deployments") or []:
        d = dict(d)
        per.setdefault(d.pop("name"), {}).update(d)
    args["deployments"] = per
    return args, dict(cfg.get("grpc_options") or {}), dict(cfg.get("http_options") or {})


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    """A local redis-server (no persistence) on a free 127.0.0.1 port; returns once it answers PING."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: run `make setup` (or apt-get install redis-server), or pass --redis-url")
    workdir = workdir.resolve()  # redis-server changes into --dir before it opens the log file
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir), "--save", "",
         "--appendonly", "no", "--logfile", str(workdir / "redis.log")],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if client.ping():
                return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.025)  # polling start-up
    proc.terminate()
    raise RuntimeError(f"redis-server did not start; see {workdir / 'redis.log'}")


def serve_main(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, single-user cluster
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from services.gateway.app import GRPC_SERVICER_FUNCTIONS, build_app

    redis_proc = None
    redis_url = args.redis_url
    if not redis_url:
        redis_proc, redis_url = start_redis(Path(".run/redis"))
        print(f"started redis-server at {redis_url}", flush=True)
    keys = args.api_keys
    if not keys:
        keys = secrets.token_urlsafe(24)
        print(f"no API key configured: generated one for this run: {keys}", flush=True)
    try:
        app_args, grpc_cfg, http_cfg = config_app_args(args.config) if args.config.is_file() else ({}, {}, {})
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
        serve.start(
            http_options={"host": "127.0.0.1", "port": 8000, **http_cfg},
            grpc_options=gRPCOptions(**{
                "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS, **grpc_cfg, "port": args.port,
            }),  # fmt: skip
        )
        app_args.update(redis_url=redis_url, api_keys=keys)
        if args.separate_vocoder:
            app_args["separate_vocoder"] = True
        if args.model_dir:
            app_args["model_dir"] = args.model_dir
        else:
            print("no MODEL_DIR: serving a tiny RANDOM checkpoint (its answers are noise)", flush=True)
        if args.device:
            app_args["device"] = args.device
        serve.run(build_app(app_args), name="minicpmo", route_prefix="/")
        print(
            f"\nMiniCPM-o serving pipeline is up.\n"
            f"  gRPC:    127.0.0.1:{args.port}  (minicpmo.v1.MiniCPMO, grpc.health.v1.Health, reflection)\n"
            f"  API key: send metadata 'x-api-key: <key>'\n"
            f"  try:     MINICPMO_API_KEY={keys.split(',')[0]} minicpmo chat --text 'Hello!'\n"
            f"  metrics: Ray's Prometheus endpoint (minicpmo_* series)\n"
            f"Ctrl-C to stop.",
            flush=True,
        )
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # delivered to sigwait, not as KeyboardInterrupt mid-call
        signal.sigwait(stop)
    finally:
        serve.shutdown()
        ray.shutdown()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
    return 0


# --- client commands --------------------------------------------------------------------------------------------


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=os.environ.get("MINICPMO_TARGET", DEFAULT_TARGET), help="gateway host:port")
    p.add_argument("--api-key", default=os.environ.get("MINICPMO_API_KEY"), help="API key (or $MINICPMO_API_KEY)")
    p.add_argument("--speech", action="store_true", help="speak the answer too")
    p.add_argument("--out", type=Path, help="write the spoken answer to this WAV file (24 kHz)")
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (reproducible)")


def register_chat(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="one chat request (text, images, audio, video frames) over gRPC")
    p.add_argument("--text", default="", help="the question")
    p.add_argument("--image", action="append", default=[], type=Path, help="an image file (repeatable)")
    p.add_argument("--audio", action="append", default=[], type=Path, help="an audio file (repeatable)")
    p.add_argument("--video", type=Path, help="a folder of frames, one per second (see `--help` of this module)")
    p.add_argument("--video-audio", type=Path, help="the video's soundtrack (audio file)")
    _client_args(p)
    p.set_defaults(func=chat_main)


def register_session(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="a live session: stream audio (and frames) in 200 ms chunks, then get the answer")
    p.add_argument("--audio", type=Path, required=True, help="the user's speech (audio file), streamed live")
    p.add_argument("--video", type=Path, help="a folder of frames, one per second, sent with the audio")
    p.add_argument("--text", default="", help="text to add after the audio")
    p.add_argument("--reference-voice", type=Path, help="a voice to clone (audio file)")
    p.add_argument("--realtime", action="store_true", help="pace the chunks at real time")
    _client_args(p)
    p.set_defaults(func=session_main)


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    pcm, sr = sf.read(str(path), dtype="float32", always_2d=False)
    return pcm, sr


def read_frames(folder: Path) -> list[bytes]:
    if not folder.is_dir():
        raise SystemExit(
            f"--video {folder}: expected a folder of frames (no video decoder is installed); extract them with "
            "`ffmpeg -i in.mp4 -vf fps=1 frames/%04d.jpg`"
        )
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"--video {folder}: no image files in the folder")
    return [f.read_bytes() for f in files]


def _options(args: argparse.Namespace):
    from services.client.sdk import generation_options

    return generation_options(max_new_tokens=args.max_new_tokens, greedy=args.greedy, speech=args.speech)


def _print_event(ev) -> None:
    kind = ev.WhichOneof("event")
    if kind == "text_delta":
        print(ev.text_delta, end="", flush=True)
    elif kind == "audio":
        print(f"\n[audio chunk {ev.audio.index}: {len(ev.audio.pcm) // 4 / ev.audio.sample_rate:.2f} s]",
              file=sys.stderr, flush=True)  # fmt: skip


def _report(answer, out: Path | None) -> None:
    f = answer.final
    print()
    t = f.timings
    print(
        f"[{f.usage.prompt_tokens} prompt + {f.usage.completion_tokens} answer tokens; first token "
        f"{t.time_to_first_token_ms:.0f} ms; first audio {t.time_to_first_audio_ms:.0f} ms; total {t.total_ms:.0f} ms; "
        f"{f.usage.audio_seconds:.2f} s of speech]",
        file=sys.stderr,
    )
    if out is not None:
        import soundfile as sf

        sf.write(str(out), answer.audio, 24000)
        print(f"wrote {out}", file=sys.stderr)


def chat_main(args: argparse.Namespace) -> int:
    from services.client.sdk import Answer, MiniCPMOClient, audio, image, text, user, video

    parts = [image(p.read_bytes()) for p in args.image]
    parts += [audio(*read_audio(p)) for p in args.audio]
    if args.video:
        sound = read_audio(args.video_audio) if args.video_audio else (None, 16000)
        parts.append(video(read_frames(args.video), *sound))
    if args.text:
        parts.append(text(args.text))
    if not parts:
        raise SystemExit("nothing to send: give --text, --image, --audio or --video")
    with MiniCPMOClient(args.target, api_key=args.api_key) as client:
        answer = Answer.collect(client.chat_stream([user(*parts)], options=_options(args)), _print_event)
    _report(answer, args.out)
    return 0


def session_main(args: argparse.Namespace) -> int:
    import soxr

    from services.client.sdk import Answer, MiniCPMOClient

    pcm, sr = read_audio(args.audio)
    if pcm.ndim == 2:
        pcm = pcm.mean(axis=1)
    if sr != 16000:
        pcm = soxr.resample(pcm, sr, 16000).astype(np.float32)
    frames = read_frames(args.video) if args.video else []
    ref = read_audio(args.reference_voice) if args.reference_voice else (None, 16000)
    with MiniCPMOClient(args.target, api_key=args.api_key) as client:
        sid = client.create_session(reference_voice=ref[0], ref_sample_rate=ref[1]).session_id
        print(f"session {sid}", file=sys.stderr)
        try:
            step = 3200  # 200 ms
            for i in range(0, len(pcm), step):
                second = i // 16000
                frame = [frames[second]] if frames and i % 16000 == 0 and second < len(frames) else []
                t0 = time.perf_counter()
                r = client.append(sid, audio=pcm[i : i + step], frames=frame)
                if r.units_prefilled:
                    print(f"[unit prefilled; {r.token_count} tokens in the session]", file=sys.stderr)
                if args.realtime:
                    time.sleep(max(0.0, 0.2 - (time.perf_counter() - t0)))  # pacing a simulated live microphone
            if args.text:
                client.append(sid, text=args.text)
            answer = Answer.collect(client.respond_stream(sid, _options(args)), _print_event)
        finally:
            client.close_session(sid)
    _report(answer, args.out)
    return 0
