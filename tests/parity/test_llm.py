"""Parity of the prompt builder and the LLM backbone with upstream (golden cases e1..e4, f, j, k).

Prompts are built by our own builder from the case messages (image sizes from the input files, audio lengths
from the wavs); embeddings of images/audio are the golden rows spliced at OUR bounds, so this module checks
the prompt + splice + backbone independently of the encoders.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2ForCausalLM
from transformers.cache_utils import DynamicCache

from services.common.checkpoint import UNUSED_AT_INFERENCE, CheckpointReader
from services.common.config import ModelConfig, real_config
from services.common.generation import GREEDY
from services.common.image_layout import ImageProcessorConfig
from services.gateway.detokenize import IncrementalDetokenizer
from services.gateway.prompts import (
    AudioRef,
    ImageRef,
    Message,
    PlaceholderSettings,
    PromptError,
    StreamingPromptState,
    assistant_prefix,
    build_chat_prompt,
    build_streaming_prefill,
    system_prompt,
)
from services.gateway.tokenizer import SpecialTokens, load_tokenizer
from services.llm_core.engine.attention import ArenaAttention, SeqSpan
from services.llm_core.engine.kv_cache import KVAllocator, KVArena
from services.llm_core.generate import generate_solo
from services.llm_core.model import (
    LLMModel,
    build_llm_model,
    checkpoint_layout,
    load_llm_model,
    random_llm_model,
    sequential_pieces,
)

E_CASES = ["e1_text_only", "e2_image_text", "e3_audio_text", "e4_omni_units"]


@pytest.fixture(scope="module")
def model(golden) -> LLMModel:
    return load_llm_model(golden.checkpoint)


@pytest.fixture(scope="module")
def tokenizer(golden):
    return load_tokenizer(golden.checkpoint)


@pytest.fixture(scope="module")
def image_cfg(golden) -> ImageProcessorConfig:
    return ImageProcessorConfig.from_model_dir(golden.checkpoint)


def to_message(golden, msg: dict) -> Message:
    """A cases.json message as our Message: images by their file's size, audio by the wav's length."""
    content = []
    for c in msg["content"]:
        if isinstance(c, str):
            content.append(c)
        elif "image" in c:
            with Image.open(golden.path(c["image"])) as im:
                content.append(ImageRef(size_wh=im.size, key=c["image"]))
        else:
            content.append(AudioRef(num_samples=len(golden.wav(c["audio"])), key=c["audio"]))
    return Message(msg["role"], content)


def golden_pieces(prompt, golden_embeds: torch.Tensor):
    """Splice the reference encoder rows found at our bounds (their token rows are our own embeddings)."""
    bounds = prompt.image_bounds + prompt.audio_bounds
    return [(s, e, golden_embeds[s:e]) for s, e in bounds]


def bounds_tensor(bounds) -> torch.Tensor:
    return torch.tensor(bounds, dtype=torch.long).reshape(-1, 2)


def check_logits(golden, prefix: str, logits: torch.Tensor) -> None:
    top2 = logits.topk(2, dim=-1).values
    golden.check(f"{prefix}.logits_last8", logits[-8:])
    golden.check(f"{prefix}.logits_argmax", logits.argmax(-1))
    golden.check(f"{prefix}.logits_max", top2[:, 0])
    golden.check(f"{prefix}.logits_top2_margin", top2[:, 0] - top2[:, 1])
    golden.check(f"{prefix}.logits_logsumexp", logits.logsumexp(-1))


def chat_prompt(golden, tokenizer, image_cfg, case: str):
    c = golden.cases[case]
    kw = dict(c["chat_kwargs"])
    settings = PlaceholderSettings.chat(image_cfg, kw.get("max_slice_nums"), kw.get("use_image_id"))
    msgs = [to_message(golden, m) for m in c["msgs"]]
    return build_chat_prompt(
        msgs, tokenizer, settings, omni_input=kw.get("omni_input", False),
        use_tts_template=kw.get("use_tts_template", False),
    )


@pytest.mark.parametrize("case", E_CASES)
def test_chat_prompt_ids_and_bounds(golden, tokenizer, image_cfg, case):
    p = chat_prompt(golden, tokenizer, image_cfg, case)
    assert p.rendered == golden.cases[case]["prompt_after_template"]
    golden.check(f"e.{case}.input_ids", torch.tensor([p.input_ids]))
    golden.check(f"e.{case}.image_bound", bounds_tensor(p.image_bounds))
    golden.check(f"e.{case}.audio_bounds", bounds_tensor(p.audio_bounds))
    golden.check(f"e.{case}.spk_bounds", bounds_tensor(p.spk_bounds))


@pytest.mark.parametrize("case", E_CASES)
def test_chat_forward_and_greedy(golden, tokenizer, image_cfg, model, case):
    p = chat_prompt(golden, tokenizer, image_cfg, case)
    pre = f"e.{case}"
    embeds = model.embed(torch.tensor(p.input_ids), golden_pieces(p, golden[f"{pre}.inputs_embeds"]))
    golden.check(f"{pre}.inputs_embeds", embeds)
    spk = p.spk_bounds[-1][0] if p.spk_bounds else None
    sp = SpecialTokens.from_tokenizer(tokenizer)
    res = generate_solo(model, embeds, GREEDY.with_(max_new_tokens=12), sp.stop_ids, spk_position=spk)
    logits, _ = model.step(embeds, model.new_cache())
    check_logits(golden, pre, logits)
    golden.check(f"{pre}.last_hidden_state", res.prompt_hidden)
    golden.check(f"{pre}.generated_ids", torch.tensor(res.ids))
    golden.check(f"{pre}.generated_step_logits", res.step_logits)
    if f"{pre}.spk_embeds" in golden.names(case):
        golden.check(f"{pre}.spk_embeds", res.spk_hidden.unsqueeze(0))
    # upstream's answer text; it also drops id 0 ("!"), which we deliberately keep, so feed it the same ids
    detok = IncrementalDetokenizer(tokenizer, drop_ids=sp.stop_ids)
    detok.push(i for i in res.ids if i != 0)
    detok.finish()
    assert detok.text.replace("<|tts_eos|>", "") == golden.cases[case]["answer_text"]


def test_sequential_pieces_fill_bounds_in_order(golden, tokenizer, image_cfg, model):
    """Audio of a message fills its 1 s chunk bounds one after another from the concatenated embeddings."""
    case = "e4_omni_units"
    p = chat_prompt(golden, tokenizer, image_cfg, case)
    ref = golden[f"e.{case}.inputs_embeds"]
    img = torch.cat([ref[s:e] for s, e in p.image_bounds])
    aud = torch.cat([ref[s:e] for s, e in p.audio_bounds])
    pieces = sequential_pieces(p.image_bounds, img) + sequential_pieces(p.audio_bounds, aud)
    golden.check(f"e.{case}.inputs_embeds", model.embed(torch.tensor(p.input_ids), pieces))


def test_streaming_session(golden, tokenizer, image_cfg, model):
    c = golden.cases["f_streaming_session"]
    sp = SpecialTokens.from_tokenizer(tokenizer)
    state = StreamingPromptState()
    settings = PlaceholderSettings.streaming(image_cfg)
    cache = model.new_cache()
    for i, pf in enumerate(c["prefills"]):
        msg = to_message(golden, pf["msg"])
        if i == 0:  # the session opens with the omni system prompt carrying the reference voice
            ref = next(x for x in msg.parts() if isinstance(x, AudioRef))
            assert system_prompt("omni", "en", ref) == msg
        p = build_streaming_prefill(msg, state, tokenizer, settings)
        assert p.rendered == pf["prompt_text"]
        assert len(p) == pf["n_tokens"]
        assert [list(b) for b in p.image_bounds] == pf["image_bound"]
        assert [list(b) for b in p.audio_bounds] == pf["audio_bounds"]
        golden.check(f"f.prefill{i}.input_ids", torch.tensor([p.input_ids]))
        embeds = model.embed(torch.tensor(p.input_ids), golden_pieces(p, golden[f"f.prefill{i}.inputs_embeds"]))
        golden.check(f"f.prefill{i}.inputs_embeds", embeds)
        model.step(embeds, cache)
        assert cache.get_seq_length() == pf["llm_kv_len_after"]

    prefix = assistant_prefix(tokenizer)
    assert prefix.text == c["assistant_prefix"]
    golden.check("f.assistant_prefix_ids", torch.tensor(prefix.input_ids))
    assert [list(b) for b in prefix.spk_bounds] == [c["spk_bound_in_prefix"]]

    # upstream generates in calls of 3 tokens, feeding the last id back with the cache: replay that exactly
    state.on_generate()
    ids, step_logits = [], []
    detok = IncrementalDetokenizer(tokenizer, drop_ids=sp.stop_ids)
    inputs = model.embed(torch.tensor(prefix.input_ids))
    for k, call in enumerate(c["generate_calls"]):
        assert cache.get_seq_length() == call["past_len"] and inputs.shape[0] == call["input_len"]
        res = generate_solo(
            model, inputs, GREEDY.with_(max_new_tokens=3), sp.stop_ids,
            spk_position=prefix.spk_bounds[0][0] if k == 0 else None, cache=cache,
        )
        assert res.ids == call["new_ids"]
        if k == 0:
            golden.check("f.prefix_last_hidden_state", res.prompt_hidden)
            golden.check("f.spk_hidden", res.spk_hidden.unsqueeze(0))
        ids += res.ids
        step_logits.append(res.step_logits)
        assert detok.push(i for i in res.ids if i != 0) == c["yielded_texts"][k]
        inputs = model.embed(torch.tensor(res.ids[-1:]))
    assert cache.get_seq_length() == c["llm_kv_len_final"]
    golden.check("f.generated_ids", torch.tensor(ids))
    golden.check("f.generated_step_logits", torch.cat(step_logits))


def test_streaming_turn_prefixes_after_answers(tokenizer, image_cfg):
    """After a finished answer the next user turn closes it; after an interrupted one it also ends the speech."""
    settings = PlaceholderSettings.streaming(image_cfg)
    state = StreamingPromptState()
    build_streaming_prefill(system_prompt("omni", "en"), state, tokenizer, settings)
    assert build_streaming_prefill(Message("user", ["a"]), state, tokenizer, settings).rendered == "<|im_start|>user\na"
    assert build_streaming_prefill(Message("user", ["b"]), state, tokenizer, settings).rendered == "b"
    state.on_generate()
    state.on_generate_end(stopped_on_eos=True)
    p = build_streaming_prefill(Message("user", ["c"]), state, tokenizer, settings)
    assert p.rendered == "<|im_end|>\n<|im_start|>user\nc"
    state.on_generate()
    state.on_generate_end(stopped_on_eos=False)
    p = build_streaming_prefill(Message("user", ["d"]), state, tokenizer, settings)
    assert p.rendered == "<|tts_eos|><|im_end|>\n<|im_start|>user\nd"


def test_system_prompts(golden):
    ref = AudioRef(num_samples=16000)
    for key, expected in golden.cases["j_sys_prompts"]["prompts"].items():
        fields = dict(kv.split("=") for kv in key.split(","))
        audio = ref if fields["ref_audio"] != "None" else None
        if "error" in expected:
            with pytest.raises(PromptError, match="voice_cloning"):
                system_prompt(fields["mode"], fields["language"], audio)
            continue
        msg = system_prompt(fields["mode"], fields["language"], audio)
        assert msg.role == expected["role"]
        got = ["<ref_audio ndarray>" if isinstance(x, AudioRef) else x for x in msg.parts()]
        assert got == expected["content"], key


def test_tokenizer(golden, tokenizer):
    k = golden.cases["k_tokenizers"]
    for text, ids in k["llm"].items():
        assert tokenizer.encode(text) == ids, text
    for tok, i in k["llm_special_ids"].items():
        assert tokenizer.convert_tokens_to_ids(tok) == i, tok
    assert len(tokenizer) == k["llm_len"]
    sp = SpecialTokens.from_tokenizer(tokenizer)
    for name, s in SpecialTokens.STRINGS.items():
        if s in k["llm_special_ids"]:
            assert getattr(sp, name) == k["llm_special_ids"][s], s


def test_official_keys_at_real_size(golden):
    """At the real config (meta device) the backbone reads exactly the official `llm.` tensors, each once, and the
    pieces it stacks into a fused parameter fill it exactly."""
    official = json.loads((golden.root / "official_keys.json").read_text())["shapes"]
    expected = {
        k: tuple(v) for k, v in official.items() if k.startswith("llm.") and not k.startswith(tuple(UNUSED_AT_INFERENCE))
    }
    model = build_llm_model(real_config(), device="meta")
    layout = checkpoint_layout(model)
    assert {k: shape for k, (_, _, shape) in layout.items()} == expected
    filled: dict[str, int] = {}
    for name, row, shape in sorted(layout.values(), key=lambda x: (x[0], x[1])):
        assert row == filled.get(name, 0), name  # pieces follow each other with no gap or overlap
        filled[name] = row + shape[0]
    assert filled == {name: p.shape[0] for name, p in model.named_parameters()}
    assert "layers.0.self_attn.qkv_proj.weight" in filled and "layers.0.mlp.gate_up_proj.weight" in filled


def transformers_reference(golden) -> Qwen2ForCausalLM:
    """transformers' own Qwen2ForCausalLM (SDPA) with the checkpoint's `llm.` weights, unfused."""
    model = build_llm_model(ModelConfig.from_model_dir(golden.checkpoint))
    ref = Qwen2ForCausalLM(model.config)
    state = CheckpointReader(golden.checkpoint).load(["llm."], dtype=torch.float32, strip="llm.")
    ref.load_state_dict(state, strict=True)
    return ref.eval()


def test_forward_equals_transformers_qwen2(golden):
    """Our fused forward (plain F.linear and oneDNN-prepacked) against transformers' Qwen2ForCausalLM on the same
    weights: a prompt, a chunk after it, then decode steps, logits and last hidden states."""
    ref = transformers_reference(golden)
    prompt = golden["e.e2_image_text.inputs_embeds"]
    chunk = golden["e.e1_text_only.inputs_embeds"][:7]
    fed = golden["e.e1_text_only.generated_ids"][:3]
    for prepack in (False, True):
        ours = load_llm_model(golden.checkpoint, prepack=prepack)
        cache, hf_cache = ours.new_cache(), DynamicCache(config=ref.config)
        for embeds in [prompt, chunk, *(ours.embed(fed[i : i + 1]) for i in range(len(fed)))]:
            logits, hidden = ours.step(embeds, cache)
            with torch.inference_mode():
                out = ref(inputs_embeds=embeds[None], past_key_values=hf_cache, use_cache=True, output_hidden_states=True)
            torch.testing.assert_close(logits, out.logits[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(hidden, out.hidden_states[-1][0], rtol=1e-4, atol=1e-4)
        assert cache.get_seq_length() == hf_cache.get_seq_length() == len(prompt) + len(chunk) + len(fed)


def test_packed_prefill_and_decode_of_several_sessions_equal_solo(golden, model):
    """Every case's prompt packed into one forward over the engine's KV arena (each row attending to its own
    session only), then one batched decode step, match the solo references (same golden rules)."""
    embeds = [golden[f"e.{c}.inputs_embeds"] for c in E_CASES]
    lens = [e.shape[0] for e in embeds]
    kv = KVAllocator(num_blocks=64, block_size=16)
    arena = KVArena(model.cfg.num_hidden_layers, 64, 16, model.cfg.num_key_value_heads, model.cfg.head_dim,
                    torch.float32, "cpu")  # fmt: skip
    attn = ArenaAttention(arena)
    rows = [sum(lens[:b]) for b in range(len(lens))]
    for b, n in enumerate(lens):
        kv.create(E_CASES[b])
        kv.reserve(E_CASES[b], n + 1)
    attn.prepare([SeqSpan(row, n, kv.offset(c), 0) for row, n, c in zip(rows, lens, E_CASES)])
    hidden = model.forward(torch.cat(embeds), torch.cat([torch.arange(n) for n in lens]), attn)
    logits = model.compute_logits(hidden)
    for b, case in enumerate(E_CASES):
        golden.check(f"e.{case}.logits_last8", logits[rows[b] + lens[b] - 8 : rows[b] + lens[b]])
        golden.check(f"e.{case}.last_hidden_state", hidden[rows[b] : rows[b] + lens[b]])
    first = torch.stack([golden[f"e.{c}.generated_ids"][0] for c in E_CASES])
    attn.prepare([SeqSpan(b, 1, kv.offset(c), n) for b, (n, c) in enumerate(zip(lens, E_CASES))])
    step = model.compute_logits(model.forward(model.embed(first), torch.tensor(lens), attn))
    for b, case in enumerate(E_CASES):
        ref = golden[f"e.{case}.generated_step_logits"]
        err = (step[b] - ref[1]).abs().max().item()
        assert err <= golden.specs[f"e.{case}.generated_step_logits"]["compare"]["atol"], (case, err)


# --- end to end: the real encoders' outputs spliced at our bounds -------------------------------------------------


@pytest.fixture(scope="module")
def vision(golden):
    from services.vision_encoder.encoder import ImageEmbedder

    return ImageEmbedder.from_checkpoint(golden.checkpoint)


@pytest.fixture(scope="module")
def audio(golden):
    from services.audio_encoder.encoder import AudioEmbedder

    return AudioEmbedder.from_checkpoint(golden.checkpoint)


def encoder_pieces(golden, prompt, vision, audio, max_slice_nums, stream=None):
    """Pieces from the real encoders: images sliced as the prompt says, audio clips joined per message
    (offline), or chunk by chunk through a Whisper stream state (streaming)."""
    from services.common.audio import join_parts

    pieces, tgt_sizes = [], None
    if prompt.images:
        pre = vision.preprocess([Image.open(golden.path(im.key)) for im in prompt.images], max_slice_nums)
        tgt_sizes = torch.as_tensor(np.concatenate([p.tgt_sizes for p in pre]))
        rows = torch.cat([e.embeddings for e in vision.encode_preprocessed(pre)])
        pieces += sequential_pieces(prompt.image_bounds, rows)
    if prompt.audios:
        wavs = [golden.wav(a.key) for a in prompt.audios]
        if stream is None:
            clips = [join_parts([wavs[i] for i in group]) for group in prompt.audio_clips()]
            rows = torch.cat(audio.encode(clips))
        else:
            rows = torch.cat([audio.encode_chunk(stream, w) for w in wavs])
        pieces += sequential_pieces(prompt.audio_bounds, rows)
    return pieces, tgt_sizes


@pytest.mark.parametrize("case", ["e2_image_text", "e3_audio_text", "e4_omni_units"])
def test_chat_end_to_end_with_encoders(golden, tokenizer, image_cfg, model, vision, audio, case):
    p = chat_prompt(golden, tokenizer, image_cfg, case)
    pre = f"e.{case}"
    pieces, tgt_sizes = encoder_pieces(golden, p, vision, audio, golden.cases[case]["chat_kwargs"].get("max_slice_nums"))
    if tgt_sizes is not None:
        golden.check(f"{pre}.tgt_sizes", tgt_sizes)
    embeds = model.embed(torch.tensor(p.input_ids), pieces)
    golden.check(f"{pre}.inputs_embeds", embeds)
    sp = SpecialTokens.from_tokenizer(tokenizer)
    spk = p.spk_bounds[-1][0] if p.spk_bounds else None
    res = generate_solo(model, embeds, GREEDY.with_(max_new_tokens=12), sp.stop_ids, spk_position=spk)
    golden.check(f"{pre}.last_hidden_state", res.prompt_hidden)
    golden.check(f"{pre}.generated_ids", torch.tensor(res.ids))
    golden.check(f"{pre}.generated_step_logits", res.step_logits)
    if spk is not None:
        golden.check(f"{pre}.spk_embeds", res.spk_hidden.unsqueeze(0))


def test_streaming_session_end_to_end_with_encoders(golden, tokenizer, image_cfg, model, vision, audio):
    """The system prompt's voice uses a Whisper stream dropped after it; the user units share a new one."""
    c = golden.cases["f_streaming_session"]
    sp = SpecialTokens.from_tokenizer(tokenizer)
    state, settings, cache = StreamingPromptState(), PlaceholderSettings.streaming(image_cfg), model.new_cache()
    stream = None
    for i, pf in enumerate(c["prefills"]):
        p = build_streaming_prefill(to_message(golden, pf["msg"]), state, tokenizer, settings)
        if i <= 1:
            stream = audio.new_stream()
        pieces, _ = encoder_pieces(golden, p, vision, audio, settings.max_slice_nums, stream=stream)
        embeds = model.embed(torch.tensor(p.input_ids), pieces)
        golden.check(f"f.prefill{i}.inputs_embeds", embeds)
        model.step(embeds, cache)
    prefix = assistant_prefix(tokenizer)
    res = generate_solo(
        model, model.embed(torch.tensor(prefix.input_ids)), GREEDY.with_(max_new_tokens=12), sp.stop_ids,
        spk_position=prefix.spk_bounds[0][0], cache=cache,
    )
    golden.check("f.prefix_last_hidden_state", res.prompt_hidden)
    golden.check("f.spk_hidden", res.spk_hidden.unsqueeze(0))
    golden.check("f.generated_ids", torch.tensor(res.ids))
    golden.check("f.generated_step_logits", res.step_logits)


def test_bf16_backbone_runs_close_to_fp32(golden, model):
    """The dtype is a constructor argument (bf16 on GPU); on CPU bf16 stays near the fp32 reference."""
    bf16 = load_llm_model(golden.checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    embeds = golden["e.e1_text_only.inputs_embeds"]
    lo16, h16 = bf16.step(embeds, bf16.new_cache())
    lo32, _ = model.step(embeds, model.new_cache())
    assert h16.dtype == torch.bfloat16 and lo16.dtype == torch.float32
    assert (lo16 - lo32).abs().max() < 0.05 * lo32.abs().max()


def test_random_weights_model_matches_the_checkpoint_layout(golden):
    from services.common.config import ModelConfig

    rnd = random_llm_model(ModelConfig.from_model_dir(golden.checkpoint), seed=1)
    ref = load_llm_model(golden.checkpoint)
    assert {k: v.shape for k, v in rnd.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    logits, _ = rnd.step(rnd.embed(torch.tensor([1, 2, 3])), rnd.new_cache())
    assert logits.shape == (3, rnd.vocab_size) and torch.isfinite(logits).all()
