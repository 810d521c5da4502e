"""Audio path against the golden set: offline (c), streaming chunk by chunk (d), and the audio features and audio
embeddings inside the chat (e3, e4) and streaming-session (f) prefills."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from services.audio_encoder.encoder import AudioEmbedder
from services.audio_encoder.model import block_causal_mask
from services.common.audio import audio_placeholder, audio_token_count, encoder_frames, join_parts
from services.audio_encoder.processor import extract_features

AUDIO_CASES_IN_PROMPTS = ["e3_audio_text", "e4_omni_units"]


@pytest.fixture(scope="module")
def encoder(golden) -> AudioEmbedder:
    return AudioEmbedder.from_checkpoint(golden.checkpoint)


def message_clip(golden, msg: dict) -> np.ndarray | None:
    """A message's audio parts joined into one clip, as upstream merges them before Whisper."""
    parts = [golden.wav(c["audio"]) for c in msg["content"] if isinstance(c, dict) and "audio" in c]
    return join_parts(parts) if parts else None


def check_rows(golden, name: str, bounds, actual: torch.Tensor) -> None:
    """`actual` equals the rows of golden `name` inside `bounds`, under that tensor's tolerance."""
    rows = torch.cat([golden[name][int(s) : int(e)] for s, e in bounds])
    assert rows.shape == actual.shape, f"{name}: audio rows {tuple(rows.shape)} != {tuple(actual.shape)}"
    err = (rows.double() - actual.double()).abs().max().item()
    atol = golden.specs[name]["compare"]["atol"]
    assert err <= atol, f"{name} audio rows: max |diff| {err:.3g} > atol {atol}"


@torch.inference_mode()
def test_c_audio_offline(golden, encoder):
    case = golden.cases["c_audio"]
    wav = golden.wav(case["wav"])
    feats = extract_features(encoder.extractor, [wav])
    golden.check("c.audio_features", feats.features)
    golden.check("c.audio_feature_lens", feats.lengths)

    model = encoder.model
    enc_lens = encoder_frames(feats.lengths)
    mask = block_causal_mask(enc_lens, int(enc_lens.max()), model.chunk_frames)
    golden.check("c.apm.attention_mask_is_masked", (~mask).to(torch.uint8))
    hidden = model.encode_offline(feats.features, feats.lengths)
    golden.check("c.apm.hidden_states_last", hidden)
    golden.check("c.audio_projection_out", model.audio_projection_layer(hidden))
    golden.check("c.audio_embeds", model.embed(hidden, enc_lens)[0])

    # The public entry point gives the same embeddings.
    golden.check("c.audio_embeds", encoder.encode([wav])[0])
    assert audio_token_count(case["samples"]) == case["n_audio_tokens"]
    assert audio_placeholder(case["samples"], chunk_input=True) == case["placeholder_chunked"]
    assert audio_placeholder(case["samples"], chunk_input=False) == case["placeholder_not_chunked"]


@torch.inference_mode()
def test_d_audio_streaming_chunk_by_chunk(golden, encoder):
    case = golden.cases["d_audio_streaming"]
    wav = golden.wav(golden.cases["c_audio"]["wav"])
    model_cache = DynamicCache()  # the model-level path, to check the encoder's hidden states too
    state = encoder.new_stream()
    assert state.length == 0
    for i, chunk in enumerate(case["chunks"]):
        pcm = wav[chunk["samples"][0] : chunk["samples"][1]]
        feats = extract_features(encoder.extractor, [pcm])
        golden.check(f"d.chunk{i}.audio_features", feats.features)
        assert int(feats.lengths[0]) == chunk["frames"]
        hidden = encoder.model.encode_streaming(feats.features, feats.lengths, [model_cache])
        golden.check(f"d.chunk{i}.apm_last_hidden_state", hidden)

        embeds = encoder.encode_chunk(state, pcm)
        golden.check(f"d.chunk{i}.audio_embeds", embeds)
        assert state.length == model_cache.get_seq_length() == chunk["whisper_kv_len_after"]
        assert audio_token_count(len(pcm)) == chunk["n_tokens"] == embeds.shape[0]
        assert audio_placeholder(len(pcm)) == chunk["placeholder"]


@pytest.mark.parametrize("case_name", AUDIO_CASES_IN_PROMPTS)
@torch.inference_mode()
def test_chat_prefill_audio(golden, encoder, case_name):
    """Chat prompts: features of each message's merged clip, and the embeddings written at the audio bounds."""
    case = golden.cases[case_name]
    clips = [c for c in (message_clip(golden, m) for m in case["msgs"]) if c is not None]
    feats = extract_features(encoder.extractor, clips)
    golden.check(f"e.{case_name}.audio_features", feats.features)
    golden.check(f"e.{case_name}.audio_feature_lens", feats.lengths[None])

    bounds = golden[f"e.{case_name}.audio_bounds"].tolist()
    parts = [c for m in case["msgs"] for c in m["content"] if isinstance(c, dict) and "audio" in c]
    assert sum(e - s for s, e in bounds) == sum(audio_token_count(p["samples"]) for p in parts)
    check_rows(golden, f"e.{case_name}.inputs_embeds", bounds, torch.cat(encoder.encode(clips)))


@torch.inference_mode()
def test_f_streaming_session_prefills(golden, encoder):
    """Streaming session: the system prompt's audio uses a cache that is then dropped; user units share one."""
    case = golden.cases["f_streaming_session"]
    state = None
    for i, prefill in enumerate(case["prefills"]):
        clip = message_clip(golden, prefill["msg"])
        name = f"f.prefill{i}.audio_features"
        if clip is None:
            assert name not in golden.names("f_streaming_session")
            continue
        golden.check(name, extract_features(encoder.extractor, [clip]).features)
        state = encoder.new_stream() if state is None else state
        embeds = encoder.encode_chunk(state, clip)
        check_rows(golden, f"f.prefill{i}.inputs_embeds", prefill["audio_bounds"], embeds)
        if i == 0:  # upstream drops the system prompt's Whisper cache after the first prefill
            state = None
        assert (state.length if state else 0) == prefill["whisper_kv_len_after"]
