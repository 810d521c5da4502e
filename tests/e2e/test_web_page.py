"""The web page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) with fake media devices
fed from a WAV (speech, then silence) and a Y4M video made here: it connects to the realtime API, streams the
microphone and camera, and receives and plays the spoken answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.e2e.media import wav

pytestmark = [pytest.mark.ray, pytest.mark.redis]
CHROMIUM = "/usr/bin/chromium"  # Debian's (`make setup`); Playwright never downloads a browser here


def fake_microphone(golden, path: Path) -> Path:
    """Speech then long silence (Chromium loops the file: the silence leaves time for the whole answer)."""
    speech = wav(golden, "speech.wav")
    audio = np.concatenate([np.zeros(8000, np.float32), speech, np.zeros(16000 * 12, np.float32)])
    sf.write(path, audio, 16000, subtype="PCM_16")
    return path


def fake_camera(path: Path, width: int = 160, height: int = 120, frames: int = 10) -> Path:
    """A Y4M (4:2:0) video: a bright square moving over a gradient."""
    with path.open("wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F5:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(frames):
            y = np.tile(np.linspace(16, 235, width, dtype=np.uint8), (height, 1))
            y[40:80, 10 + 12 * i : 50 + 12 * i] = 235
            chroma = np.full((height // 2) * (width // 2), 128, np.uint8)
            f.write(b"FRAME\n" + y.tobytes() + chroma.tobytes() + chroma.tobytes())
    return path


def test_page_streams_microphone_and_camera_and_plays_the_answer(served, golden, tmp_path):
    from playwright.sync_api import sync_playwright

    mic, camera = fake_microphone(golden, tmp_path / "mic.wav"), fake_camera(tmp_path / "camera.y4m")
    args = [
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--autoplay-policy=no-user-gesture-required",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={mic}", f"--use-file-for-fake-video-capture={camera}",
    ]  # fmt: skip
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.goto(f"{served.http_url}/")
            assert page.url.endswith("/web/")
            page.fill("#key", served.keys[0])
            page.select_option("#voice", "audio_assistant")
            page.click("#start")
            page.wait_for_function("window.minicpmo.stats.audioChunksPlayed >= 2", timeout=240_000)
            stats = page.evaluate("window.minicpmo.stats")
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            transcript = page.locator(".assistant").first.inner_text()
        finally:
            browser.close()
    assert stats["framesSent"] >= 1 and stats["audioSentMs"] >= 2000 and stats["errors"] == []
    assert stats["audioChunksReceived"] >= stats["audioChunksPlayed"] >= 2
    assert transcript.strip(), "the answer's text shows beside the audio"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
