"""`minicpmo chat` and `minicpmo session`: talk to a running pipeline over gRPC.

Video input: no video decoding library (PyAV, OpenCV, imageio) is installed with the project, so `--video`
takes a FOLDER of frames (one image per second of video, in name order) plus, optionally, the soundtrack as an
audio file (`--video-audio`); extract them with e.g. `ffmpeg -i in.mp4 -vf fps=1 frames/%04d.jpg` and
`ffmpeg -i in.mp4 -ac 1 -ar 16000 sound.wav`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_TARGET = "127.0.0.1:9000"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


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
    p.add_argument("--instructions", default="", help="your own instructions, added to the system prompt")
    p.add_argument("--realtime", action="store_true", help="pace the chunks at real time")
    _client_args(p)
    p.set_defaults(func=session_main)


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """A sound file as mono float32 (channels averaged) and its sample rate; a clear exit for a bad file."""
    import soundfile as sf

    if not path.is_file():
        raise SystemExit(f"{path}: no such file")
    try:
        pcm, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise SystemExit(f"{path}: not a readable audio file ({e}); send WAV, FLAC or OGG") from None
    return pcm.mean(axis=1, dtype=np.float32), sr


def read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise SystemExit(f"{path}: no such file")
    return path.read_bytes()


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

    parts = [image(read_bytes(p)) for p in args.image]
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
    if sr != 16000:
        pcm = soxr.resample(pcm, sr, 16000).astype(np.float32)
    frames = read_frames(args.video) if args.video else []
    ref = read_audio(args.reference_voice) if args.reference_voice else (None, 16000)
    with MiniCPMOClient(args.target, api_key=args.api_key) as client:
        sid = client.create_session(reference_voice=ref[0], ref_sample_rate=ref[1],
                                    instructions=args.instructions).session_id
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
