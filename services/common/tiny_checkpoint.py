"""Generate a tiny random MiniCPM-o 2.6 checkpoint in the official layout (`minicpmo make-tiny-checkpoint DIR`).

It is what `make run` serves and what service tests load, so the whole system runs on a laptop. Everything the
official directory holds is here, made from code: config.json (official schema, tiny dims), sharded bf16
safetensors with an index (names and shapes from `official_shapes`), a byte-level BPE tokenizer with every
MiniCPM-o special token, preprocessor_config.json, the ChatTTS WordPiece tokenizer and Vocos weights. Its weights
are random, so its answers are noise. The output depends only on the seed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from services.common.checkpoint import INDEX_FILE
from services.common.checkpoint_layout import official_shapes
from services.common.config import ModelConfig

# ---------------------------------------------------------------------------------------------------------------
# The tiny dimensions, defined once. Like the golden set: every width small, every structural constant official
# (query_num, slicing, 70x70 position grid, Whisper mel bins and 1500 positions, TTS vocab of audio codes, DVAE).
# LLM hidden is a multiple of 128 because the resampler uses hidden // 128 heads.
TINY_LLM = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096}
TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_AUDIO = {"d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 256}
TINY_TTS = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2}
BPE_VOCAB_SIZE = 1200  # target; the trainer stops earlier if the corpus has fewer merges

# Shards by prefix group, like the official checkpoint's split (each service reads few shards).
SHARD_GROUPS: tuple[tuple[str, ...], ...] = (("llm.",), ("vpm.", "resampler.", "apm.", "audio_projection_layer."), ("tts.",))

# ---------------------------------------------------------------------------------------------------------------
# Tokenizer facts (strings, order and flags of the official files).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# (content, special) of the official `added_tokens_decoder`, in id order; `<unk>` first (official id 128244).
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<unk>", True), ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<image>", True), ("</image>", True), ("<ref>", True), ("</ref>", True), ("<box>", True), ("</box>", True),
    ("<quad>", True), ("</quad>", True), ("<point>", True), ("</point>", True), ("<slice>", True),
    ("</slice>", True), ("<image_id>", True), ("</image_id>", True), ("<unit>", True), ("</unit>", True),
    ("<asr>", True), ("</asr>", True), ("<query>", True), ("</query>", True), ("<|audio_start|>", True),
    ("<|audio|>", True), ("<|audio_end|>", True), ("<|spk_bos|>", True), ("<|spk|>", True), ("<|spk_eos|>", True),
    ("<|tts_bos|>", True), ("<|tts_eos|>", True), ("<|listen|>", True), ("<|speak|>", True),
    ("<|interrupt|>", True), ("<|vad_start|>", True), ("<|vad_end|>", True), ("<reserved_43>", True),
    ("<reserved_53>", True),
)
# The official `additional_special_tokens` are the MiniCPM-o tokens, `<image>` onwards.
ADDITIONAL_SPECIAL_TOKENS = [t for t, _ in ADDED_TOKENS[[t for t, _ in ADDED_TOKENS].index("<image>"):]]

# The stock Qwen2.5 chat template of the official tokenizer_config.json (a prompt-format fact).
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

# The 50 ChatTTS tokens appended to the BERT vocabulary, in the official order.
CHATTTS_TOKENS: tuple[str, ...] = (
    "[Sasr]", "[Pasr]", "[Easr]", "[Stts]", "[Ptts]", "[Etts]", "[Sbreak]", "[Pbreak]", "[Ebreak]", "[uv_break]",
    "[v_break]", "[lbreak]", "[llbreak]", "[undefine]", "[laugh]", "[spk_emb]", "[empty_spk]", "[music]", "[pure]",
    *(f"[break_{i}]" for i in range(8)), *(f"[laugh_{i}]" for i in range(3)),
    *(f"[oral_{i}]" for i in range(10)), *(f"[speed_{i}]" for i in range(10)),
)
BERT_SPECIALS = ("[PAD]", *(f"[unused{i}]" for i in range(1, 10)), "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CJK_PUNCTUATION = "，。！？、：；“”‘’（）《》"
CHATTTS_WORDPIECE_SUFFIXES = ("##s", "##es", "##ed", "##ing", "##er", "##ly", "##tion", "##'s")
CHATTTS_WORD_COUNT = 200

# Written for this generator: enough English and Chinese for BPE merges and a ChatTTS word list.
CORPUS_EN = """\
You are a helpful assistant. You can accept video, audio and text input and output voice and text.
Clone the voice in the provided audio prompt. As an assistant, you will speak using this voice style.
Please describe the picture and tell me what you see in it, one thing at a time.
There is a small blue boat on the lake, and two children are waving from the shore.
The weather today is cold in the morning and warm in the afternoon, so bring a light jacket.
How many apples are left if you start with twelve and give away five? Seven apples are left.
The train to the city leaves at nine o'clock and arrives at half past ten.
My friend plays the piano every evening after dinner, and the neighbours say they like it.
Reading a book before sleeping helps me relax, although sometimes I read for too long.
Could you speak a little more slowly? I didn't catch the last part of your answer.
The library opens at eight, closes at six, and is free for students on weekends.
She planted tomatoes, beans and sunflowers in the garden behind her house.
When the wind blows from the west, it usually rains in the evening.
Thank you very much for your help! You're welcome, have a nice day.
The speech model listens to one second of audio at a time and answers as soon as it can.
Numbers like 3, 14, 2026 and 100 should be read one digit at a time in some languages.
Music, laughter and quiet pauses make a conversation feel natural.
We walked along the river, stopped at a small cafe, and talked about our plans for the summer.
The old bridge was built of stone, and it has stood for more than three hundred years.
Is it going to snow tomorrow? The forecast says it will be cloudy but dry.
He wrote a short letter to his grandmother, telling her about his new school and his friends.
Good morning, everyone. Today we will learn how machines understand pictures and sound.
The red house is next to the green tree, and the yellow car is parked in front of it.
The system message sets the rules, the user asks, and the assistant answers in text and speech.
"""
CORPUS_ZH = """\
你是一个AI助手。你能接受视频，音频和文本输入并输出语音和文本。
模仿输入音频中的声音特征。作为助手，你将使用这种声音风格说话。
请描述这张图片，告诉我你看到了什么。
湖面上有一条蓝色的小船，两个孩子在岸边挥手。
今天早上很冷，下午比较暖和，出门记得带一件薄外套。
火车九点从车站出发，十点半到达城市中心。
我的朋友每天晚饭后弹钢琴，邻居们都说很好听。
睡觉前读一本书可以让我放松，不过有时候会读得太久。
你能说得慢一点吗？我没有听清楚你最后一句话。
图书馆早上八点开门，晚上六点关门，周末对学生免费。
她在房子后面的花园里种了西红柿、豆子和向日葵。
风从西边吹来的时候，晚上通常会下雨。
非常感谢你的帮助！不客气，祝你今天愉快。
这个语音模型每次听一秒钟的声音，然后尽快回答。
我们沿着河边散步，在一家小咖啡馆停下来，聊了聊夏天的计划。
那座老桥是用石头建的，已经有三百多年的历史了。
明天会下雪吗？天气预报说会是多云，但是不会下雨。
大家早上好。今天我们来学习机器怎样理解图片和声音。
红色的房子旁边有一棵绿色的大树，黄色的汽车停在房子前面。
系统消息规定规则，用户提问，助手用文字和语音回答。
"""


def _corpus_lines() -> list[str]:
    return CORPUS_EN.splitlines() + CORPUS_ZH.splitlines()


# ---------------------------------------------------------------------------------------------------------------
# LLM tokenizer


def _train_bpe():
    """Byte-level BPE like Qwen2's: NFC, Qwen2 split regex then ByteLevel; ids 0..255 are the 256 byte symbols."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    # The trainer sorts its alphabet by code point, which is exactly GPT-2/Qwen2 byte order (id 0 = "!").
    trainer = BpeTrainer(vocab_size=BPE_VOCAB_SIZE, min_frequency=1, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_corpus_lines(), trainer)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if [tok.id_to_token(i) for i in range(256)] != alphabet:
        raise RuntimeError("BPE trainer did not put the byte alphabet at ids 0..255 in byte order")
    for content, special in ADDED_TOKENS:  # one at a time so ids follow the official order exactly
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
    return tok


def _write_llm_tokenizer(out: Path) -> dict[str, int]:
    tok = _train_bpe()
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json + merges.txt, the slow-tokenizer files of the official layout
    ids = {content: tok.token_to_id(content) for content, _ in ADDED_TOKENS}
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    decoder = {str(ids[c]): {"content": c, **flags, "special": special} for c, special in ADDED_TOKENS}
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ADDITIONAL_SPECIAL_TOKENS,
        "bos_token": "<|im_start|>",
        "chat_template": QWEN25_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "auto_map": {"AutoTokenizer": ["tokenization_minicpmo_fast.MiniCPMOTokenizerFast", None]},
        "tokenizer_class": "MiniCPMOTokenizerFast",
        "unk_token": "<unk>",
    })
    _write_json(out / "special_tokens_map.json", {
        "additional_special_tokens": ADDITIONAL_SPECIAL_TOKENS,
        "bos_token": {"content": "<|im_start|>", **flags},
        "eos_token": {"content": "<|im_end|>", **flags},
        "pad_token": {"content": "<|endoftext|>", **flags},
        "unk_token": "<unk>",
    })
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True), **ids}


# ---------------------------------------------------------------------------------------------------------------
# ChatTTS tokenizer (BertTokenizerFast, WordPiece, laid out like bert-base-chinese + the ChatTTS tokens)


def _chattts_vocab() -> list[str]:
    words = Counter(w for w in re.findall(r"[a-z]+", CORPUS_EN.lower()) if len(w) > 1)
    top_words = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:CHATTTS_WORD_COUNT]]
    cjk = list(dict.fromkeys(c for c in CORPUS_ZH if "\u4e00" <= c <= "\u9fff"))
    return [
        *BERT_SPECIALS, *string.punctuation, *CJK_PUNCTUATION, *string.digits, *string.ascii_lowercase,
        *(f"##{c}" for c in string.ascii_lowercase + string.digits), *top_words, *CHATTTS_WORDPIECE_SUFFIXES, *cjk,
    ]


def _write_chattts_tokenizer(out: Path) -> dict[str, int]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    out.mkdir(parents=True, exist_ok=True)
    vocab = _chattts_vocab()
    (out / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab), encoding="utf-8")
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CHATTTS_TOKENS):
        tok.add_special_tokens([AddedToken(t, normalized=False)])
    tok.save(str(out / "tokenizer.json"))

    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    ids = {t: tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CHATTTS_TOKENS)}
    _write_json(out / "added_tokens.json", {t: ids[t] for t in sorted(CHATTTS_TOKENS)})
    _write_json(out / "special_tokens_map.json", {
        "additional_special_tokens": [{"content": t, **flags} for t in CHATTTS_TOKENS],
        "cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]", "unk_token": "[UNK]",
    })
    _write_json(out / "tokenizer_config.json", {
        "added_tokens_decoder": {str(i): {"content": t, **flags, "special": True} for t, i in ids.items()},
        "additional_special_tokens": list(CHATTTS_TOKENS),
        "clean_up_tokenization_spaces": True,
        "cls_token": "[CLS]",
        "do_basic_tokenize": True,
        "do_lower_case": True,
        "mask_token": "[MASK]",
        "model_max_length": 1000000000000000019884624838656,
        "never_split": None,
        "pad_token": "[PAD]",
        "sep_token": "[SEP]",
        "strip_accents": None,
        "tokenize_chinese_chars": True,
        "tokenizer_class": "BertTokenizer",
        "unk_token": "[UNK]",
    })
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True), **ids}


# ---------------------------------------------------------------------------------------------------------------
# config.json and preprocessor_config.json


def tiny_config_json(llm_tok: dict[str, int], tts_tok: dict[str, int]) -> dict[str, Any]:
    """config.json in the official schema with the tiny dims; token ids come from the generated tokenizers."""
    n_layers = TINY_LLM["num_hidden_layers"]
    return {
        "_name_or_path": "openbmb/MiniCPM-o-2_6",
        "architectures": ["MiniCPMO"],
        "attention_dropout": 0.0,
        "bos_token_id": llm_tok["<|endoftext|>"],  # as official (151643): the Qwen2 base bos is <|endoftext|>
        "eos_token_id": llm_tok["<|im_end|>"],
        "hidden_act": "silu",
        **TINY_LLM,
        "initializer_range": 0.02,
        "max_window_layers": n_layers,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vocab_size": llm_tok["vocab_size"],
        "batch_vision_input": True,
        "drop_vision_last_layer": False,
        "image_size": 448,
        "audio_chunk_length": 1.0,
        "audio_config": {
            "_name_or_path": "openai/whisper-medium",
            "architectures": ["MiniCPMWhisperEncoder"],
            "begin_suppress_tokens": [220, 50257],
            "bos_token_id": 50257,
            **TINY_AUDIO,
            # decoder fields are unused by the encoder; kept tiny like the encoder's
            "decoder_attention_heads": TINY_AUDIO["encoder_attention_heads"],
            "decoder_ffn_dim": TINY_AUDIO["encoder_ffn_dim"],
            "decoder_layers": TINY_AUDIO["encoder_layers"],
            "decoder_start_token_id": 50258,
            "eos_token_id": 50257,
            "max_length": 448,
            "model_type": "whisper",
            "num_hidden_layers": TINY_AUDIO["encoder_layers"],
            "pad_token_id": 50257,
            "torch_dtype": "float32",
            "num_mel_bins": 80,
            "max_source_positions": 1500,
        },
        "audio_pool_step": 2,
        "auto_map": {
            "AutoConfig": "configuration_minicpm.MiniCPMOConfig",
            "AutoModel": "modeling_minicpmo.MiniCPMO",
            "AutoModelForCausalLM": "modeling_minicpmo.MiniCPMO",
        },
        "chunk_input": True,
        "listen_speak_type": "asr",
        "model_type": "minicpmo",
        "patch_size": 14,
        "query_num": 64,
        "slice_config": {"max_slice_nums": 9, "model_type": "minicpmv"},
        "slice_mode": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.44.2",
        "tts_config": {
            "model_type": "conditional_chattts",
            "llm_dim": TINY_LLM["hidden_size"],
            **TINY_TTS,
            "num_text_tokens": tts_tok["vocab_size"],
            "audio_bos_token_id": tts_tok["[Ptts]"],
            "text_eos_token_id": tts_tok["[Etts]"],
            "spk_emb_token_id": tts_tok["[spk_emb]"],
            "num_audio_tokens": 626,
            "num_vq": 4,
            "num_mel_bins": 100,
            "streaming_text_chunk_size": 10,
            "streaming_text_reserved_len": 300,
            "streaming_audio_chunk_size": 50,
        },
        "use_cache": True,
        "use_image_id": True,
        "version": 2.6,
        "vision_batch_size": 16,
        "vision_config": {
            **TINY_VISION,
            "image_size": 980,
            "model_type": "siglip_vision_model",
            "patch_size": 14,
        },
    }


# What the upstream processor reads (MiniCPMVImageProcessor + WhisperFeatureExtractor), official values.
PREPROCESSOR_CONFIG: dict[str, Any] = {
    "image_processor_type": "MiniCPMVImageProcessor",
    "feature_extractor_type": "WhisperFeatureExtractor",
    "processor_class": "MiniCPMOProcessor",
    "auto_map": {
        "AutoProcessor": "processing_minicpmo.MiniCPMOProcessor",
        "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor",
    },
    "max_slice_nums": 9, "scale_resolution": 448, "patch_size": 14, "use_image_id": True, "image_feature_size": 64,
    "im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>", "unk": "<unk>",
    "im_id_start": "<image_id>", "im_id_end": "</image_id>", "slice_mode": True,
    "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5], "version": 2.6,
    "feature_size": 80, "sampling_rate": 16000, "hop_length": 160, "chunk_length": 30, "n_fft": 400,
    "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right", "padding_value": 0.0,
    "return_attention_mask": False,
}


# ---------------------------------------------------------------------------------------------------------------
# Weights


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A float32 tensor with a scale chosen by what the name is, so activations stay O(1) through the stacks.

    Matrices ~ N(0, 1/fan_in); biases small; norm weights ~ 1; layer scales ~ 0.2; LLM token embeddings ~ N(0, 1)
    (the LLM's input scale), other tables ~ N(0, 0.5); weight-norm gains ~ 1.
    """
    leaf = name.rsplit(".", 1)[-1]
    normal = torch.randn(shape, generator=gen)
    is_norm = re.search(r"(^|\.)(ln_\w+|\w*norm\w*|layer_norm\d?)\.(weight|bias)$", name) is not None
    if name == "tts.dvae.coef":  # mel scale of the DVAE output
        return 0.5 + torch.rand(shape, generator=gen)
    if leaf in ("coef", "gamma"):  # ConvNeXt layer scales
        return 0.2 + 0.05 * normal
    if leaf == "original0":  # weight_norm gain
        return 1.0 + 0.1 * normal
    if is_norm:
        return (1.0 + 0.1 * normal) if leaf == "weight" else 0.05 * normal
    if leaf.endswith("bias"):
        return 0.02 * normal
    if name == "llm.model.embed_tokens.weight" or name == "resampler.query":
        return normal
    if "emb" in name and len(shape) == 2 and "proj" not in name:  # embedding tables (codes, text, positions)
        return 0.5 * normal
    if name == "resampler.proj":  # a bare (D, D) parameter applied as x @ proj
        return normal / math.sqrt(shape[0])
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return normal / math.sqrt(fan_in)


def write_random_weights(out: Path, cfg: ModelConfig, seed: int) -> None:
    """Random bf16 weights for every tensor of `official_shapes(cfg)`, sharded by SHARD_GROUPS, plus the index.

    Usable for any config (e.g. `small_config()` dims for benchmarks); the values depend only on `seed`.
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = official_shapes(cfg)
    n = len(SHARD_GROUPS)
    weight_map: dict[str, str] = {}
    total = 0
    for i, prefixes in enumerate(SHARD_GROUPS, start=1):
        shard = f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors = {
            k: random_tensor(k, s, gen).to(torch.bfloat16) for k, s in shapes.items() if k.startswith(prefixes)
        }
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        weight_map |= {k: shard for k in tensors}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if set(weight_map) != set(shapes):
        raise RuntimeError(f"shard groups miss keys: {sorted(set(shapes) - set(weight_map))[:5]}")
    _write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def _write_vocos(path: Path, seed: int) -> None:
    """State dict of the Vocos that upstream builds (official sizes), random parameters stored as bf16.

    Buffers (STFT windows, mel filter bank) keep the library's values: they are not learned.
    """
    from vocos import Vocos
    from vocos.feature_extractors import MelSpectrogramFeatures
    from vocos.heads import ISTFTHead
    from vocos.models import VocosBackbone

    with torch.random.fork_rng(devices=[]):  # module constructors draw from the global RNG; keep the caller's
        vocos = Vocos(
            MelSpectrogramFeatures(sample_rate=24000, n_fft=1024, hop_length=256, n_mels=100),
            VocosBackbone(input_channels=100, dim=512, intermediate_dim=1536, num_layers=8),
            ISTFTHead(dim=512, n_fft=1024, hop_length=256),
        )
    gen = torch.Generator().manual_seed(seed)
    params = {name for name, _ in vocos.named_parameters()}
    state = {
        k: random_tensor(k, tuple(v.shape), gen).to(torch.bfloat16) if k in params else v.clone()
        for k, v in vocos.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint into `out_dir` (created if needed; our files are overwritten) and return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    llm_tok = _write_llm_tokenizer(out)
    tts_tok = _write_chattts_tokenizer(out / "assets" / "chattts_tokenizer")
    config = tiny_config_json(llm_tok, tts_tok)
    _write_json(out / "config.json", config)
    _write_json(out / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    write_random_weights(out, ModelConfig.from_dict(config), seed)
    _write_vocos(out / "assets" / "Vocos.pt", seed + 1)
    return out


def register_cli(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="write a tiny random checkpoint in the official MiniCPM-o 2.6 layout")
    p.add_argument("dir", type=Path, help="output directory (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    out = make_tiny_checkpoint(args.dir, seed=args.seed)
    print(f"tiny checkpoint written to {out} (random weights: its answers are noise)")
    return 0
