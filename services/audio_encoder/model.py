"""Whisper encoder (`apm.`), projector (`audio_projection_layer.`) and average pooling: forward + structure only.

The encoder is transformers' `WhisperEncoder` (same parameter names as upstream's MiniCPMWhisperEncoder), but we
drive its conv front-end and layers ourselves: its own forward insists on a 3000-frame (30 s) input, takes no
attention mask and no cache, while upstream runs any length up to 30 s with a block-causal 1 s chunk mask
(offline) or a per-stream KV cache (streaming).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from services.common.audio import encoder_frames, pooled_tokens
from services.common.config import AudioConfig, ModelConfig
from services.common.layers import MultiModalProjector

ENCODER_FRAMES_PER_SECOND = 50


def whisper_config(audio: AudioConfig) -> WhisperConfig:
    return WhisperConfig(
        d_model=audio.d_model,
        encoder_layers=audio.encoder_layers,
        encoder_attention_heads=audio.encoder_attention_heads,
        encoder_ffn_dim=audio.encoder_ffn_dim,
        num_mel_bins=audio.num_mel_bins,
        max_source_positions=audio.max_source_positions,
        activation_function=audio.activation_function,
        scale_embedding=audio.scale_embedding,
        attn_implementation="sdpa",  # upstream ran WhisperSdpaAttention
    )


def block_causal_mask(enc_lens: torch.Tensor, size: int, chunk: int) -> torch.Tensor:
    """Allowed-attention mask (B, 1, size, size): each `chunk`-frame block sees itself and all earlier blocks
    (upstream `subsequent_chunk_mask`, num_left_chunks=-1), and no key past the clip's true length.

    Upstream compares encoder positions with *mel* lengths for the padding part, which masks nothing for the
    longest clip of a batch and too little for shorter ones; we mask by encoder length so a clip gives the same
    output alone or batched (identical to upstream for a clip encoded alone, which is how its chat runs).
    """
    pos = torch.arange(size, device=enc_lens.device)
    visible_end = torch.clamp((pos // chunk + 1) * chunk, max=size)  # per query row
    chunk_ok = pos[None, :] < visible_end[:, None]  # (T, T)
    key_ok = pos[None, :] < enc_lens[:, None]  # (B, T)
    return (chunk_ok[None] & key_ok[:, None, :])[:, None]


class _StackedStreamCaches:
    """Presents several streams' DynamicCaches to WhisperAttention as one batched cache.

    WhisperAttention only calls `update(key, value, layer_idx)`; each stream's cache gets its own new frames
    (without batch padding) and the returned keys/values are the per-stream histories right-padded to the longest
    (the attention mask hides the padding). One stream with no padding goes straight to its own cache.
    """

    def __init__(self, caches: list[DynamicCache], new_lens: list[int]):
        self.caches, self.new_lens = caches, new_lens

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if len(self.caches) == 1 and self.new_lens[0] == key.shape[2]:
            return self.caches[0].update(key, value, layer_idx)
        full = [
            cache.update(key[b : b + 1, :, :n], value[b : b + 1, :, :n], layer_idx)
            for b, (cache, n) in enumerate(zip(self.caches, self.new_lens))
        ]
        longest = max(k.shape[2] for k, _ in full)
        keys = key.new_zeros(key.shape[0], key.shape[1], longest, key.shape[3])
        values = torch.zeros_like(keys)
        for b, (k, v) in enumerate(full):
            keys[b, :, : k.shape[2]] = k[0]
            values[b, :, : v.shape[2]] = v[0]
        return keys, values


class AudioModel(nn.Module):
    """`apm` (Whisper encoder) + `audio_projection_layer` + AvgPool1d; state-dict keys are the checkpoint's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.apm = WhisperEncoder(whisper_config(cfg.audio))
        # The stock encoder never caches, so its attention layers have no layer_idx; streaming needs one per layer.
        for i, layer in enumerate(self.apm.layers):
            layer.self_attn.layer_idx = i
        self.audio_projection_layer = MultiModalProjector(cfg.audio.encoder_ffn_dim // 4, cfg.llm.hidden_size)
        self.pool_step = cfg.audio_pool_step
        self.pool = nn.AvgPool1d(cfg.audio_pool_step, stride=cfg.audio_pool_step)
        self.chunk_frames = int(cfg.audio_chunk_length * ENCODER_FRAMES_PER_SECOND)

    @property
    def max_positions(self) -> int:
        return self.apm.embed_positions.num_embeddings

    def _front_end(self, features: torch.Tensor, mel_lens: torch.Tensor) -> torch.Tensor:
        """conv1 -> GELU -> conv2 (stride 2) -> GELU, as (B, T_enc, d).

        conv1 outputs past a clip's true length are zeroed so conv2 sees what it sees when the clip is alone
        (its zero padding), keeping batched results equal to solo ones.
        """
        apm = self.apm
        x = apm.conv1(features.to(apm.conv1.weight.dtype))
        x = nn.functional.gelu(x)
        frame = torch.arange(x.shape[-1], device=x.device)
        x = x * (frame[None, :] < mel_lens[:, None]).unsqueeze(1).to(x.dtype)
        x = nn.functional.gelu(apm.conv2(x))
        return x.transpose(1, 2)

    def _layers(self, x: torch.Tensor, mask: torch.Tensor | None, cache=None) -> torch.Tensor:
        """The encoder layers (transformers' own forward; `cache` reaches WhisperAttention) + final layer_norm."""
        for layer in self.apm.layers:
            x = layer(x, mask, past_key_values=cache)
        return self.apm.layer_norm(x)

    def encode_offline(self, features: torch.Tensor, mel_lens: torch.Tensor) -> torch.Tensor:
        """Block-causal encoding of a padded batch of <= 30 s pieces: (B, n_mels, T) -> (B, T_enc, d)."""
        x = self._front_end(features, mel_lens)
        if x.shape[1] > self.max_positions:
            raise ValueError(f"{x.shape[1]} encoder frames exceed the {self.max_positions} Whisper positions")
        x = x + self.apm.embed_positions.weight[: x.shape[1]]
        enc_lens = encoder_frames(mel_lens)
        return self._layers(x, block_causal_mask(enc_lens, x.shape[1], self.chunk_frames))

    def encode_streaming(
        self, features: torch.Tensor, mel_lens: torch.Tensor, caches: list[DynamicCache]
    ) -> torch.Tensor:
        """One new chunk per stream, attending to everything in that stream's cache (upstream passes no mask).

        Positions continue from each cache's length; the caller resets caches before they would pass the
        position table. Appends the chunk's keys/values to each cache.
        """
        x = self._front_end(features, mel_lens)
        cached = torch.tensor([c.get_seq_length() for c in caches], device=x.device)
        new_lens = encoder_frames(mel_lens).to(x.device)
        if int((cached + new_lens).max()) > self.max_positions:
            raise ValueError(f"stream would pass the {self.max_positions} Whisper positions; reset it first")
        pos = cached[:, None] + torch.arange(x.shape[1], device=x.device)[None, :]
        x = x + self.apm.embed_positions.weight[pos.clamp(max=self.max_positions - 1)]
        mask = None
        if len(caches) > 1:
            key = torch.arange(int((cached + new_lens).max()), device=x.device)
            mask = (key[None, :] < (cached + new_lens)[:, None])[:, None, None, :]
        return self._layers(x, mask, _StackedStreamCaches(caches, new_lens.tolist()))

    def embed(self, hidden: torch.Tensor, enc_lens: torch.Tensor) -> list[torch.Tensor]:
        """Projector -> AvgPool1d -> trim each item to its token count: list of (n_tokens, llm_hidden)."""
        proj = self.audio_projection_layer(hidden)
        if proj.shape[1] < self.pool_step:  # a clip this short has 0 tokens (upstream's AvgPool1d would raise)
            return [proj[b, :0] for b in range(proj.shape[0])]
        pooled = self.pool(proj.transpose(1, 2)).transpose(1, 2)
        return [pooled[b, : pooled_tokens(int(n), self.pool_step)] for b, n in enumerate(enc_lens)]
