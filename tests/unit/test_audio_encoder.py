"""AudioEmbedder on the golden tiny checkpoint: official key layout, batching invariance, >30 s clips, streaming
state (explicit, batched across streams, reset at the 1500-position limit), input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from services.audio_encoder.encoder import PREFIXES, AudioEmbedder
from services.audio_encoder.model import AudioModel
from services.common.audio import AudioInputError, audio_token_count
from services.common.checkpoint import UNUSED_AT_INFERENCE
from services.common.config import real_config

ATOL = 1e-5  # fp32 batched vs solo: same math, different padding / GEMM shapes


@pytest.fixture(scope="module")
def encoder(golden) -> AudioEmbedder:
    return AudioEmbedder.from_checkpoint(golden.checkpoint)


def noise(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)


def test_real_config_has_official_keys(golden):
    with torch.device("meta"):
        model = AudioModel(real_config())
    official = json.loads(golden.path("official_keys.json").read_text())["shapes"]
    skipped = tuple(UNUSED_AT_INFERENCE)
    expected = {k: tuple(v) for k, v in official.items() if k.startswith(PREFIXES) and not k.startswith(skipped)}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_batch_equals_single_calls(encoder):
    clips = [noise(s, i) for i, s in enumerate([0.7, 2.05, 1.0, 0.013, 3.3])]  # odd/even mel lengths, one tiny
    batched = encoder.encode(clips)
    for clip, out in zip(clips, batched):
        solo = encoder.encode([clip])[0]
        assert out.shape == solo.shape == (audio_token_count(len(clip)), encoder.hidden_size)
        torch.testing.assert_close(out, solo, atol=ATOL, rtol=0)


def test_long_clip_is_cut_into_30s_pieces(encoder):
    clip = noise(31.5, 7)
    out = encoder.encode([clip])[0]
    pieces = encoder.encode([clip[:480000], clip[480000:]])
    assert out.shape[0] == audio_token_count(len(clip))
    torch.testing.assert_close(out, torch.cat(pieces), atol=ATOL, rtol=0)


def test_streams_batched_equal_streams_alone(encoder):
    histories = [[noise(1, 10)], [noise(1, 11), noise(1, 12)], []]  # streams at different cache lengths
    new = [noise(1, 20), noise(0.6, 21), noise(1.2, 22)]
    alone, together = [], [encoder.new_stream() for _ in histories]
    for hist, chunk, state in zip(histories, new, together):
        solo = encoder.new_stream()
        for h in hist:
            encoder.encode_chunk(solo, h)
            encoder.encode_chunk(state, h)
        alone.append((encoder.encode_chunk(solo, chunk), solo.length))
    outs = encoder.encode_chunks(together, new)
    for (ref, ref_len), out, state in zip(alone, outs, together):
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
        assert state.length == ref_len


def test_first_chunk_matches_offline_within_one_second(encoder):
    clip = noise(1, 3)  # one block: block-causal offline == full attention streaming
    torch.testing.assert_close(encoder.encode_chunk(encoder.new_stream(), clip), encoder.encode([clip])[0])


def test_stream_resets_at_position_limit(encoder):
    third = encoder.model.max_positions // 3  # Whisper frames of each chunk (50 per second)
    chunk = noise(third / 50, 5)
    state = encoder.new_stream()
    encoder.encode_chunk(state, chunk)
    encoder.encode_chunk(state, chunk)
    assert state.length == 2 * third and state.resets == 0
    out = encoder.encode_chunk(state, chunk)  # the third chunk reaches the limit: upstream starts a new cache first
    assert state.length == third and state.resets == 1
    torch.testing.assert_close(out, encoder.encode_chunk(encoder.new_stream(), chunk))
    assert state.nbytes() > 0


def test_bad_chunk_leaves_stream_untouched(encoder):
    state = encoder.new_stream()
    encoder.encode_chunk(state, noise(1, 1))
    with pytest.raises(AudioInputError, match="NaN"):
        encoder.encode_chunk(state, np.full(1600, np.nan, np.float32))
    with pytest.raises(AudioInputError, match="limit is 30 s"):
        encoder.encode_chunk(state, noise(31, 2))
    with pytest.raises(ValueError, match="twice"):
        encoder.encode_chunks([state, state], [noise(1, 3), noise(1, 4)])
    assert state.length == 50


def test_failed_forward_leaves_stream_unchanged(encoder):
    state, reference = encoder.new_stream(), encoder.new_stream()
    for st in (state, reference):
        encoder.encode_chunk(st, noise(1, 30))

    def fail(*_):
        raise RuntimeError("simulated device failure")

    hook = encoder.model.apm.layers[-1].register_forward_pre_hook(fail)  # after the first layers cached the chunk
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            encoder.encode_chunk(state, noise(1, 31))
    finally:
        hook.remove()
    assert [layer.get_seq_length() for layer in state.cache.layers] == [reference.length] * len(state.cache.layers)
    torch.testing.assert_close(encoder.encode_chunk(state, noise(1, 32)), encoder.encode_chunk(reference, noise(1, 32)))


def test_other_sample_rates_are_resampled_before_encoding(encoder):
    one_second_48k = np.repeat(noise(1, 9), 3)
    assert encoder.encode([one_second_48k], sample_rate=48000)[0].shape[0] == audio_token_count(16000)


def test_bfloat16_runs_close_to_float32(golden, encoder):
    bf16 = AudioEmbedder.from_checkpoint(golden.checkpoint, dtype=torch.bfloat16)
    clip = noise(1.5, 4)
    ref = encoder.encode([clip])[0]
    out = bf16.encode([clip])[0]
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()
