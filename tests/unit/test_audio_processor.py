"""Audio preprocessing: token-count rule, placeholders, input checks, resampling, stereo, feature windows."""

from __future__ import annotations

import numpy as np
import pytest

from services.audio_encoder import processor as P
from services.common import audio as A
from services.common.audio import AudioInputError, audio_placeholder, audio_token_count, validate_pcm


def reference_token_count(samples: int) -> int:
    """Upstream get_audio_placeholder, step by step (pool step 2)."""
    frames = -(-samples // 160)
    frames = (frames - 1) // 2 + 1
    return (frames - 2) // 2 + 1


@pytest.mark.parametrize(
    "samples, tokens",
    [(1, 0), (160, 0), (320, 0), (321, 1), (480, 1), (481, 1), (641, 1), (960, 1), (961, 2), (15999, 25), (16000, 25),
     (16001, 25), (16320, 25), (16321, 26), (41600, 65), (480000, 750), (480001, 750), (960000, 1500)],
)
def test_token_count_edges(samples, tokens):
    assert audio_token_count(samples) == tokens == reference_token_count(samples)


def test_token_count_matches_reference_everywhere_small():
    assert all(audio_token_count(n) == reference_token_count(n) for n in range(1, 5000))


def groups(placeholder: str) -> list[int]:
    body = placeholder.split(A.AUDIO_START)[1:]
    assert all(g.endswith(A.AUDIO_END) for g in body)
    return [g.count(A.AUDIO_FILLER) for g in body]


def test_placeholder_chunks_per_second_last_shorter():
    assert groups(audio_placeholder(16000)) == [25]
    assert groups(audio_placeholder(41600)) == [25, 25, 15]
    assert groups(audio_placeholder(32000)) == [25, 25]
    assert groups(audio_placeholder(41600, chunk_input=False)) == [65]


def test_placeholder_zero_tokens():
    # upstream: no chunk group at all when chunked, an empty start/end pair when not
    assert audio_placeholder(100) == ""
    assert audio_placeholder(100, chunk_input=False) == A.AUDIO_START + A.AUDIO_END


def test_validate_accepts_mono_float32_unchanged():
    x = np.linspace(-0.5, 0.5, 1000, dtype=np.float32)
    out = validate_pcm(x, 16000)
    assert out.dtype == np.float32 and np.array_equal(out, x)


@pytest.mark.parametrize(
    "pcm, rate, message",
    [
        (np.zeros(0, np.float32), 16000, "empty"),
        (np.array([0.0, np.nan], np.float32), 16000, "NaN"),
        (np.array([0.0, np.inf], np.float32), 16000, "NaN or infinite"),
        (np.zeros(100, np.uint8), 16000, "dtype"),
        (np.zeros(100, np.complex64), 16000, "dtype"),
        (np.zeros((2, 3, 4), np.float32), 16000, "expected 1-D"),
        (np.zeros(100, np.float32), 16001, "sample rate"),
        (np.zeros((2, 1000), np.float32), 16000, "channels-first"),
        (np.zeros(16000 * 11, np.float32), 16000, "limit is 10 s"),
    ],
)
def test_validate_refuses_bad_input(pcm, rate, message):
    with pytest.raises(AudioInputError, match=message):
        validate_pcm(pcm, rate, max_seconds=10)
    assert issubclass(AudioInputError, ValueError)


def test_int_pcm_is_scaled_like_soundfile():
    for dtype in ("<i2", ">i2"):  # either byte order, e.g. straight from a WAV or a network buffer
        out = validate_pcm(np.array([-32768, 0, 16384], dtype), 16000)
        assert out.dtype == np.float32 and out.tolist() == [-1.0, 0.0, 0.5]
    assert validate_pcm(np.array([-(2**31), 2**30], np.int32), 16000).tolist() == [-1.0, 0.5]


def test_stereo_is_downmixed_by_mean():
    left = np.sin(np.linspace(0, 20, 4000)).astype(np.float32)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)  # (frames, channels) as soundfile returns
    np.testing.assert_allclose(validate_pcm(stereo, 16000), left / 2, atol=1e-7)
    np.testing.assert_array_equal(validate_pcm(left[:, None], 16000), left)


@pytest.mark.parametrize("rate", A.ACCEPTED_SAMPLE_RATES)
def test_accepted_rates_resample_to_16k(rate):
    t = np.arange(rate) / rate  # 1 s of a 440 Hz tone
    out = validate_pcm(np.sin(2 * np.pi * 440 * t).astype(np.float32), rate)
    assert out.dtype == np.float32 and abs(len(out) - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(out[: 16000 // 2 * 2]))
    assert abs(np.argmax(spectrum) * 16000 / (len(out) // 2 * 2) - 440) < 2


def test_split_and_join():
    clip = np.arange(61 * 16000, dtype=np.float32)
    pieces = P.split_pieces(clip)
    assert [len(p) for p in pieces] == [480000, 480000, 16000]
    np.testing.assert_array_equal(A.join_parts(pieces), clip)
    assert sum(audio_token_count(len(p)) for p in pieces) == audio_token_count(len(clip))


@pytest.fixture(scope="module")
def extractor():
    return P.WhisperFeatureExtractor(feature_size=80)


@pytest.mark.parametrize("samples", [1, 161, 399, 16000, 41601, 479_500])
@pytest.mark.parametrize("kind", ["noise", "click_at_end", "silence"])
def test_short_feature_window_equals_30s_window(extractor, samples, kind):
    rng = np.random.default_rng(samples)
    x = (rng.standard_normal(samples) * 0.1).astype(np.float32)
    if kind != "noise":
        x[:] = 0
    if kind == "click_at_end":
        x[-1] = 0.9
    ours = P.extract_features(extractor, [x])
    full = extractor([x], sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
    n = int(full["attention_mask"].sum())
    assert int(ours.lengths[0]) == n == A.mel_frames(samples)
    np.testing.assert_allclose(ours.features[0].numpy(), full["input_features"][0, :, :n].numpy(), atol=1e-6)


def test_features_batch_pads_with_zeros(extractor):
    a, b = np.full(8000, 0.1, np.float32), np.full(16000, 0.1, np.float32)
    feats = P.extract_features(extractor, [a, b])
    assert feats.lengths.tolist() == [50, 100]
    assert feats.features.shape == (2, 80, 100) and not feats.features[0, :, 50:].any()
    np.testing.assert_allclose(feats.features[0, :, :50], P.extract_features(extractor, [a]).features[0], atol=1e-6)
