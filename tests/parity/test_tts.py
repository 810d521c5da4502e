"""Parity of the speech decoder against the golden set: cases g_tts, h_dvae, i_vocos and k_tokenizers (ChatTTS)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from services.common.checkpoint import UNUSED_AT_INFERENCE, CheckpointReader
from services.common.config import ModelConfig, real_config
from services.tts_decoder.dvae import DVAE
from services.tts_decoder.generation import CodeGenerator, TextPrefill
from services.tts_decoder.model import (
    build_tts,
    load_tts,
    make_streaming_chunk_mask_generation,
    streaming_visibility,
    with_prefix,
)
from services.tts_decoder.sampler import CodeSampler
from services.tts_decoder.text import ChatTTSText
from services.tts_decoder.vocoder import WaveDecoder


@pytest.fixture(scope="module")
def cfg(golden):
    return ModelConfig.from_model_dir(golden.checkpoint).tts


@pytest.fixture(scope="module")
def text(golden, cfg):
    return ChatTTSText(golden.checkpoint, cfg)


@pytest.fixture(scope="module")
def tts(golden, cfg):
    return load_tts(CheckpointReader(golden.checkpoint), cfg)


@pytest.fixture(scope="module")
def vocoder(golden):
    return WaveDecoder.from_checkpoint(golden.checkpoint)


def test_g_text_layout_and_masks(golden, cfg, text):
    case = golden.cases["g_tts"]
    layout = text.layout(case["text"])
    assert layout.n_text == case["tts_token_lens"]
    golden.check("g.tts_input_ids", torch.tensor(layout.ids))
    text_mask = text.text_mask(layout.n_text)
    golden.check("g.streaming_tts_text_mask", text_mask)
    for past in case["mask_past_lengths"]:
        golden.check(f"g.mask.past{past}", make_streaming_chunk_mask_generation(past, 1, text_mask, cfg))
    full = text.text_mask(text.reserved - 2)  # the reference's "full text" mask: _build_streaming_mask(298)
    for name in golden.names("g_tts"):
        if name.startswith("g.mask_fulltext.past"):
            past = int(name.removeprefix("g.mask_fulltext.past"))
            golden.check(name, make_streaming_chunk_mask_generation(past, 1, full, cfg))


@torch.inference_mode()
def test_g_conditioning_and_teacher_forced_logits(golden, cfg, text, tts):
    case = golden.cases["g_tts"]
    golden.check("g.spk_hidden_in", golden["g.spk_hidden_in"])
    layout = text.layout(case["text"])
    ids = torch.tensor(layout.ids)
    spk = tts.speaker_embedding(golden["g.spk_hidden_in"])
    golden.check("g.spk_emb_projected_normalized", spk)
    golden.check("g.condition_embeds", tts.embed_text(ids, spk))

    # Replay the reference's prefill schedule into a KV slot, then feed the forced codes one step at a time.
    text_mask = text.text_mask(layout.n_text)
    gen = CodeGenerator(tts, CodeSampler(cfg, tts.eos_id), slots=1)
    seg = gen.open(text_mask, greedy=True, generator=None)
    for begin, end in case["prefill_schedule"]:
        gen.prefill_text([(seg, TextPrefill(ids[begin:end], begin, spk if begin == 0 else None))])
    forced = golden["g.forced_codes"]
    golden.check("g.forced_codes", forced)
    logits, hidden, positions = [], [], []
    for step in range(forced.shape[0]):
        embed = tts.audio_bos_embedding() if step == 0 else tts.embed_codes(forced[step - 1])
        past = tts.condition_length - 1 + step
        visible = streaming_visibility(past, 1, text_mask, cfg)
        at = torch.tensor([[past]])
        h = tts(embed[None, None], at, visible[None, None], gen.pool.span(seg.slot, seg.slot + 1, at, past + 1))
        hidden.append(h[0, 0])
        logits.append(tts.head_logits(h)[0, 0])
        positions.append(past)
    golden.check("g.head_logits", torch.stack(logits))
    golden.check("g.step_last_hidden", torch.stack(hidden))
    golden.check("g.step_position_ids", torch.tensor(positions))


@torch.inference_mode()
def test_h_dvae(golden, vocoder):
    codes = golden["h.codes"]
    golden.check("h.codes", codes)
    vq = vocoder.dvae.vq_features(codes)
    golden.check("h.vq_feats", vq)
    golden.check("h.decoder_out", vocoder.dvae.decoder_out(vq))
    golden.check("h.mel", vocoder.mel(codes))


@torch.inference_mode()
def test_i_vocos(golden, vocoder):
    mel = golden["i.mel_in"]
    golden.check("i.mel_in", mel)
    golden.check("i.backbone_out", vocoder.vocos.backbone(mel))
    golden.check("i.wav", vocoder.mel_to_audio(mel)[0])
    golden.check("i.wav", torch.from_numpy(vocoder.decode(golden["h.codes"][0])))


def test_k_chattts_tokenizer(golden, text):
    case = golden.cases["k_tokenizers"]
    for string, ids in case["chattts"].items():
        assert text.encode(string) == ids, string
    for token, idx in case["chattts_special_ids"].items():
        assert text.tokenizer.convert_tokens_to_ids(token) == idx, token
    assert len(text.tokenizer) == case["chattts_len"]


@torch.inference_mode()
def test_batched_dvae_and_vocos_equal_single(golden, vocoder):
    codes = golden["h.codes"][0]
    pair = torch.stack([codes, codes.flip(0)])
    batched = vocoder.mel_to_audio(vocoder.mel(pair))
    for i in range(2):
        single = vocoder.mel_to_audio(vocoder.mel(pair[i]))[0]
        torch.testing.assert_close(batched[i], single, atol=1e-5, rtol=0)


def test_official_tts_keys_at_real_config(golden):
    """Built at the real config on the meta device, `tts.` names/shapes equal the official ones (minus unused)."""
    official = json.loads(Path(golden.root, "official_keys.json").read_text())["shapes"]
    expected = {k: tuple(v) for k, v in official.items()
                if k.startswith("tts.") and not k.startswith(tuple(UNUSED_AT_INFERENCE))}
    dvae = DVAE()  # fixed upstream size, small; FSQ cannot be built on meta (it calls .item() in __init__)
    tts = with_prefix("tts.", build_tts(real_config().tts, "meta"))
    mine = {k: tuple(v.shape) for k, v in tts.state_dict().items()}
    mine |= {k: tuple(v.shape) for k, v in with_prefix("tts.dvae.", dvae).state_dict().items()}
    assert mine == expected
