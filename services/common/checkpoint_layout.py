"""Every tensor name and shape of the official MiniCPM-o 2.6 checkpoint layout, for any config.

This is the state dict of upstream's `MiniCPMO(config)` (parameters and persistent buffers), written out from the
config instead of building the modules, so it is cheap enough for `inspect-checkpoint`, the tiny-checkpoint
generator and shape tests. Parts upstream hard-codes (the DVAE and its GFSQ quantizer) are at their official size
whatever the config says. Insertion order follows upstream's state dict.
"""

from __future__ import annotations

import re

from services.common.config import AudioConfig, LLMConfig, ModelConfig, TTSConfig, VisionConfig

Shapes = dict[str, tuple[int, ...]]

# Service prefixes: which deployment loads which part of the checkpoint.
SERVICE_PREFIXES: dict[str, tuple[str, ...]] = {
    "vision": ("vpm.", "resampler."),
    "audio": ("apm.", "audio_projection_layer."),
    "llm": ("llm.",),
    "tts": ("tts.",),
}

# DVAE hard-coded by upstream (`DVAE()` with default arguments; facts from the official checkpoint).
DVAE_MEL_BINS = 100
DVAE_DIM = 512
DVAE_HIDDEN = 256
DVAE_BOTTLENECK = 128
DVAE_LAYERS = 12
DVAE_FFN = 1024  # ConvNeXt pointwise width (4 x hidden)
DVAE_KERNEL = 7
DVAE_ENCODER_OUT = 1024
GFSQ_DIM = 1024
GFSQ_GROUPS = 2
GFSQ_LEVELS = (5, 5, 5, 5)

# LlamaConfig's default vocabulary: the TTS LlamaModel builds this unused table (it always gets inputs_embeds).
TTS_UNUSED_VOCAB = 32000


def _linear(name: str, out_dim: int, in_dim: int, bias: bool = True) -> Shapes:
    shapes: Shapes = {f"{name}.weight": (out_dim, in_dim)}
    if bias:
        shapes[f"{name}.bias"] = (out_dim,)
    return shapes


def _norm(name: str, dim: int, bias: bool = True) -> Shapes:
    """LayerNorm (weight + bias) or RMSNorm (weight only)."""
    return {f"{name}.weight": (dim,)} | ({f"{name}.bias": (dim,)} if bias else {})


def _conv1d(name: str, out_ch: int, in_ch: int, kernel: int, bias: bool = True) -> Shapes:
    return {f"{name}.weight": (out_ch, in_ch, kernel)} | ({f"{name}.bias": (out_ch,)} if bias else {})


def _decoder_layers(prefix: str, n_layers: int, hidden: int, intermediate: int, q_dim: int, kv_dim: int,
                    qkv_bias: bool) -> Shapes:
    """Qwen2 / Llama decoder layers (same names; Qwen2 has q/k/v biases)."""
    shapes: Shapes = {}
    for i in range(n_layers):
        p = f"{prefix}.layers.{i}"
        shapes |= _linear(f"{p}.self_attn.q_proj", q_dim, hidden, qkv_bias)
        shapes |= _linear(f"{p}.self_attn.k_proj", kv_dim, hidden, qkv_bias)
        shapes |= _linear(f"{p}.self_attn.v_proj", kv_dim, hidden, qkv_bias)
        shapes |= _linear(f"{p}.self_attn.o_proj", hidden, q_dim, bias=False)
        shapes |= _linear(f"{p}.mlp.gate_proj", intermediate, hidden, bias=False)
        shapes |= _linear(f"{p}.mlp.up_proj", intermediate, hidden, bias=False)
        shapes |= _linear(f"{p}.mlp.down_proj", hidden, intermediate, bias=False)
        shapes |= _norm(f"{p}.input_layernorm", hidden, bias=False)
        shapes |= _norm(f"{p}.post_attention_layernorm", hidden, bias=False)
    return shapes


def llm_shapes(llm: LLMConfig) -> Shapes:
    """`llm.`: Qwen2ForCausalLM."""
    d, hd = llm.hidden_size, llm.head_dim
    shapes: Shapes = {"llm.model.embed_tokens.weight": (llm.vocab_size, d)}
    shapes |= _decoder_layers("llm.model", llm.num_hidden_layers, d, llm.intermediate_size,
                              llm.num_attention_heads * hd, llm.num_key_value_heads * hd, qkv_bias=True)
    shapes |= _norm("llm.model.norm", d, bias=False)
    if not llm.tie_word_embeddings:  # a tied head is saved once, as embed_tokens
        shapes["llm.lm_head.weight"] = (llm.vocab_size, d)
    return shapes


def vpm_shapes(vision: VisionConfig, n_layers: int) -> Shapes:
    """`vpm.`: NaViT SigLIP vision tower (no pooling head)."""
    d, p = vision.hidden_size, vision.patch_size
    shapes: Shapes = {
        "vpm.embeddings.patch_embedding.weight": (d, vision.num_channels, p, p),
        "vpm.embeddings.patch_embedding.bias": (d,),
        "vpm.embeddings.position_embedding.weight": (vision.num_patches_per_side**2, d),
    }
    for i in range(n_layers):
        l = f"vpm.encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes |= _linear(f"{l}.self_attn.{proj}", d, d)
        shapes |= _norm(f"{l}.layer_norm1", d)
        shapes |= _linear(f"{l}.mlp.fc1", vision.intermediate_size, d)
        shapes |= _linear(f"{l}.mlp.fc2", d, vision.intermediate_size)
        shapes |= _norm(f"{l}.layer_norm2", d)
    return shapes | _norm("vpm.post_layernorm", d)


def resampler_shapes(cfg: ModelConfig) -> Shapes:
    """`resampler.`: one cross-attention from `query_num` learned queries onto the vision tokens."""
    d, kv = cfg.llm.hidden_size, cfg.vision.hidden_size
    shapes: Shapes = {"resampler.query": (cfg.query_num, d), "resampler.proj": (d, d)}
    if kv != d:  # upstream uses nn.Identity (no weight) when the widths already match
        shapes |= _linear("resampler.kv_proj", d, kv, bias=False)
    shapes |= {"resampler.attn.in_proj_weight": (3 * d, d), "resampler.attn.in_proj_bias": (3 * d,)}
    shapes |= _linear("resampler.attn.out_proj", d, d)
    for ln in ("ln_q", "ln_kv", "ln_post"):
        shapes |= _norm(f"resampler.{ln}", d)
    return shapes


def apm_shapes(audio: AudioConfig) -> Shapes:
    """`apm.`: Whisper encoder (k_proj has no bias in Whisper)."""
    d, ffn = audio.d_model, audio.encoder_ffn_dim
    shapes = _conv1d("apm.conv1", d, audio.num_mel_bins, 3) | _conv1d("apm.conv2", d, d, 3)
    shapes["apm.embed_positions.weight"] = (audio.max_source_positions, d)
    for i in range(audio.encoder_layers):
        l = f"apm.layers.{i}"
        shapes |= _linear(f"{l}.self_attn.k_proj", d, d, bias=False)
        for proj in ("v_proj", "q_proj", "out_proj"):
            shapes |= _linear(f"{l}.self_attn.{proj}", d, d)
        shapes |= _norm(f"{l}.self_attn_layer_norm", d)
        shapes |= _linear(f"{l}.fc1", ffn, d) | _linear(f"{l}.fc2", d, ffn)
        shapes |= _norm(f"{l}.final_layer_norm", d)
    return shapes | _norm("apm.layer_norm", d)


def audio_projection_shapes(cfg: ModelConfig) -> Shapes:
    """`audio_projection_layer.`: MLP from Whisper width (upstream: encoder_ffn_dim // 4) to the LLM width."""
    d = cfg.llm.hidden_size
    return _linear("audio_projection_layer.linear1", d, cfg.audio.encoder_ffn_dim // 4) | _linear(
        "audio_projection_layer.linear2", d, d
    )


def _dvae_convnext(prefix: str, odim: int) -> Shapes:
    """One DVAEDecoder (the encoder path is the same class with a wider output)."""
    shapes = _conv1d(f"{prefix}.conv_in.0", DVAE_BOTTLENECK, DVAE_DIM, 3)
    shapes |= _conv1d(f"{prefix}.conv_in.2", DVAE_HIDDEN, DVAE_BOTTLENECK, 3)
    for i in range(DVAE_LAYERS):
        b = f"{prefix}.decoder_block.{i}"
        shapes[f"{b}.coef"] = (DVAE_HIDDEN,)
        shapes |= {f"{b}.dwconv.weight": (DVAE_HIDDEN, 1, DVAE_KERNEL), f"{b}.dwconv.bias": (DVAE_HIDDEN,)}
        shapes |= _norm(f"{b}.norm", DVAE_HIDDEN)
        shapes |= _linear(f"{b}.pwconv1", DVAE_FFN, DVAE_HIDDEN) | _linear(f"{b}.pwconv2", DVAE_HIDDEN, DVAE_FFN)
    return shapes | _conv1d(f"{prefix}.conv_out", odim, DVAE_HIDDEN, 1, bias=False)


def dvae_shapes() -> Shapes:
    """`tts.dvae.`: official size regardless of the config (upstream hard-codes it)."""
    shapes: Shapes = {"tts.dvae.coef": (1, DVAE_MEL_BINS, 1)}
    shapes |= _conv1d("tts.dvae.downsample_conv.0", DVAE_DIM, DVAE_MEL_BINS, 3)
    shapes |= _conv1d("tts.dvae.downsample_conv.2", DVAE_DIM, DVAE_DIM, 4)
    shapes |= _dvae_convnext("tts.dvae.encoder", DVAE_ENCODER_OUT)
    shapes |= _dvae_convnext("tts.dvae.decoder", DVAE_DIM)
    shapes |= _conv1d("tts.dvae.out_conv", DVAE_MEL_BINS, DVAE_DIM, 3, bias=False)
    group_dim, codebook_dim = GFSQ_DIM // GFSQ_GROUPS, len(GFSQ_LEVELS)
    for g in range(GFSQ_GROUPS):
        q = f"tts.dvae.vq_layer.quantizer.rvqs.{g}"
        shapes |= _linear(f"{q}.project_in", codebook_dim, group_dim) | _linear(f"{q}.project_out", group_dim, codebook_dim)
    return shapes


def tts_shapes(tts: TTSConfig) -> Shapes:
    """`tts.`: ConditionalChatTTS (projector, code/text embeddings, weight-normed heads, DVAE, Llama backbone)."""
    d = tts.hidden_size
    if tts.use_mlp:
        shapes = _linear("tts.projector.linear1", d, tts.llm_dim) | _linear("tts.projector.linear2", d, d)
    else:
        shapes = _linear("tts.projector", d, tts.llm_dim, bias=False)
    for q in range(tts.num_vq):
        shapes[f"tts.emb_code.{q}.weight"] = (tts.num_audio_tokens, d)
    shapes["tts.emb_text.weight"] = (tts.num_text_tokens, d)
    for q in range(tts.num_vq):  # torch weight_norm parametrization: g (out, 1) and v (out, in)
        shapes[f"tts.head_code.{q}.parametrizations.weight.original0"] = (tts.num_audio_tokens, 1)
        shapes[f"tts.head_code.{q}.parametrizations.weight.original1"] = (tts.num_audio_tokens, d)
    shapes |= dvae_shapes()
    shapes["tts.model.embed_tokens.weight"] = (TTS_UNUSED_VOCAB, d)
    shapes |= _decoder_layers("tts.model", tts.num_hidden_layers, d, tts.intermediate_size, d, d, qkv_bias=False)
    return shapes | _norm("tts.model.norm", d, bias=False)


def official_shapes(cfg: ModelConfig) -> Shapes:
    """Name -> shape of every tensor in the official checkpoint built at `cfg` (upstream state-dict order)."""
    return (
        llm_shapes(cfg.llm)
        | vpm_shapes(cfg.vision, cfg.vision_layers_used)
        | resampler_shapes(cfg)
        | apm_shapes(cfg.audio)
        | audio_projection_shapes(cfg)
        | tts_shapes(cfg.tts)
    )


def layer_pattern(key: str) -> str:
    """`key` with its layer index replaced by `*`: checkpoints of the same layout but different depths agree."""
    return re.sub(r"\.layers\.\d+\.", ".layers.*.", key)


def service_of(key: str) -> str | None:
    """Which service (vision / audio / llm / tts) loads `key`, or None if no service prefix matches."""
    for service, prefixes in SERVICE_PREFIXES.items():
        if key.startswith(prefixes):
            return service
    return None
