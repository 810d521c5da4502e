"""Server-side turn detection on the packaged silero-vad model, fed the golden speech recording and silence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.gateway.openai.vad import SpeechStarted, SpeechStopped, TurnDetector, VadSettings, VadSettingsError

SR = 16000


@pytest.fixture(scope="module")
def speech(golden) -> np.ndarray:
    return golden.wav("inputs/speech.wav")


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), np.float32)


def feed(detector: TurnDetector, pcm: np.ndarray, chunk: int = 480) -> list:
    """The stream as a client sends it: 30 ms chunks (not a multiple of the model's 32 ms window)."""
    events = []
    for i in range(0, pcm.shape[0], chunk):
        events += detector.push(pcm[i : i + chunk])
    return events


def speech_span_ms(pcm: np.ndarray) -> tuple[int, int]:
    """First and last loud sample of the recording, in ms (where a listener hears speech)."""
    loud = np.flatnonzero(np.abs(pcm) > 0.05 * np.abs(pcm).max())
    return int(loud[0] * 1000 // SR), int(loud[-1] * 1000 // SR)


def test_speech_then_silence_is_one_turn(speech):
    settings = VadSettings(threshold=0.5, silence_duration_ms=500, prefix_padding_ms=300)
    detector = TurnDetector(settings)
    lead = 1.0
    events = feed(detector, np.concatenate([silence(lead), speech, silence(1.5)]))
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]
    first, last = speech_span_ms(speech)
    start = events[0].audio_start_ms + settings.prefix_padding_ms  # where the model heard speech begin
    assert lead * 1000 + first - 100 <= start <= lead * 1000 + first + 200
    # stopped once the silence after the last speech lasted silence_duration_ms (a few windows of slack)
    end = events[1].audio_end_ms
    assert lead * 1000 + last + 500 <= end <= lead * 1000 + last + 500 + 300
    assert not detector.speaking
    assert detector.samples == int((lead + 1.5) * SR) + speech.shape[0]


def test_silence_and_quiet_noise_are_no_speech():
    detector = TurnDetector(VadSettings())
    noise = np.random.default_rng(0).normal(0, 0.002, 3 * SR).astype(np.float32)
    assert feed(detector, np.concatenate([silence(2.0), noise])) == []
    assert not detector.speaking


def test_silence_duration_decides_whether_a_pause_ends_the_turn(speech):
    # the recording has a ~150 ms pause after its first word: a short silence_duration splits the turn there
    audio = np.concatenate([silence(0.5), speech, silence(1.0)])
    patient = feed(TurnDetector(VadSettings(silence_duration_ms=500)), audio)
    eager = feed(TurnDetector(VadSettings(silence_duration_ms=64)), audio)
    assert [type(e) for e in patient] == [SpeechStarted, SpeechStopped]
    assert [type(e) for e in eager] == [SpeechStarted, SpeechStopped] * 2


def test_threshold_decides_how_sure_the_model_must_be(speech):
    quiet = np.concatenate([speech * 0.05, silence(1.0)])  # ~-26 dB: the model is only fairly sure it is speech
    assert [type(e) for e in feed(TurnDetector(VadSettings(threshold=0.5)), quiet)] == [SpeechStarted, SpeechStopped]
    assert feed(TurnDetector(VadSettings(threshold=0.9)), quiet) == []


def test_detectors_keep_their_own_state(speech):
    """Each detector runs its own copy of the recurrent model: interleaved streams do not disturb each other."""
    alone = feed(TurnDetector(VadSettings()), np.concatenate([speech, silence(1.0)]))
    a, b = TurnDetector(VadSettings()), TurnDetector(VadSettings())
    stream_a = np.concatenate([speech, silence(1.0)])
    stream_b = silence(stream_a.shape[0] / SR)
    events_a, events_b = [], []
    for i in range(0, stream_a.shape[0], 480):
        events_a += a.push(stream_a[i : i + 480])
        events_b += b.push(stream_b[i : i + 480])
    assert events_a == alone and events_b == []


def test_loading_the_model_keeps_torch_thread_count():
    before = torch.get_num_threads()
    TurnDetector(VadSettings())
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "kwargs",
    [{"threshold": 0.1}, {"threshold": 1.0}, {"silence_duration_ms": 0}, {"prefix_padding_ms": -1}],
)
def test_settings_out_of_range_are_refused(kwargs):
    with pytest.raises(VadSettingsError):
        VadSettings(**kwargs)
