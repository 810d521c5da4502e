"""The audio encoder service's engine: PCM in, LLM-width embeddings out, offline (batched) or streaming.

Streaming state is an explicit `AudioStreamState` the caller owns (one per live session): the model holds no
per-stream attributes, so one replica serves many sessions and several streams' chunks batch into one forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache, WhisperFeatureExtractor

from services.audio_encoder.model import AudioModel
from services.common.audio import MAX_AUDIO_SECONDS, SAMPLE_RATE, encoder_frames, validate_pcm
from services.audio_encoder.processor import PIECE_SECONDS, extract_features, load_feature_extractor, split_pieces
from services.common.checkpoint import CheckpointReader, load_module
from services.common.config import ModelConfig

PREFIXES = ("apm.", "audio_projection_layer.")


@dataclass
class AudioStreamState:
    """One live stream's Whisper KV cache; its length is the next chunk's position offset."""

    cache: DynamicCache = field(default_factory=DynamicCache)
    resets: int = 0  # times the 1500-position limit restarted the cache

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def nbytes(self) -> int:
        layers = [layer for layer in self.cache.layers if layer.is_initialized]
        return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))


def _truncate(cache: DynamicCache, length: int) -> None:
    """Drop frames past `length` in every layer (a forward that failed half-way appended to only some)."""
    for layer in cache.layers:
        excess = layer.get_seq_length() - length
        if excess > 0:
            layer.crop(-excess)


class AudioEmbedder:
    """Whisper encoder + projector + feature extractor: PCM in, LLM-width embeddings out."""

    def __init__(
        self,
        model: AudioModel,
        extractor: WhisperFeatureExtractor,
        max_batch_pieces: int = 16,
        max_seconds: float = MAX_AUDIO_SECONDS,
    ):
        self.model = model.eval()
        self.extractor = extractor
        self.device = next(model.parameters()).device
        self.max_batch_pieces = max_batch_pieces
        self.max_seconds = max_seconds

    @classmethod
    def from_checkpoint(
        cls, model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
        progress: bool = False, **kwargs,
    ) -> AudioEmbedder:
        """Loads only `apm.` and `audio_projection_layer.` of the checkpoint."""
        with torch.device("meta"):
            model = AudioModel(ModelConfig.from_model_dir(model_dir))
        load_module(model, CheckpointReader(model_dir), PREFIXES, dtype=dtype, device=device, progress=progress)
        return cls(model, load_feature_extractor(model_dir), **kwargs)

    @classmethod
    def with_random_weights(
        cls, cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
        **kwargs,
    ) -> AudioEmbedder:
        """An encoder of `cfg`'s sizes with random weights (benchmarks of configs that have no checkpoint)."""
        torch.manual_seed(seed)
        model = AudioModel(cfg).to(device=device, dtype=dtype)
        return cls(model, WhisperFeatureExtractor(feature_size=cfg.audio.num_mel_bins), **kwargs)

    @property
    def hidden_size(self) -> int:
        return self.model.audio_projection_layer.linear2.out_features

    @torch.inference_mode()
    def encode(self, audios: list[np.ndarray], sample_rate: int = SAMPLE_RATE) -> list[torch.Tensor]:
        """Offline (block-causal) embeddings, one (n_tokens, llm_hidden) tensor per clip.

        Each array is one clip (a message's audio parts already joined with `join_parts`); clips over 30 s are
        cut into 30 s pieces and their embeddings concatenated, as upstream fills the bounds in order. Pieces of
        all clips are batched (shortest first, `max_batch_pieces` at a time); results do not depend on batching.
        """
        clips = [validate_pcm(a, sample_rate, self.max_seconds) for a in audios]
        pieces = [(i, piece) for i, clip in enumerate(clips) for piece in split_pieces(clip)]
        order = sorted(range(len(pieces)), key=lambda j: len(pieces[j][1]))
        embeds: list[torch.Tensor | None] = [None] * len(pieces)
        for start in range(0, len(order), self.max_batch_pieces):
            batch = order[start : start + self.max_batch_pieces]
            feats = extract_features(self.extractor, [pieces[j][1] for j in batch])
            mel_lens = feats.lengths.to(self.device)
            hidden = self.model.encode_offline(feats.features.to(self.device), mel_lens)
            for j, e in zip(batch, self.model.embed(hidden, encoder_frames(mel_lens))):
                embeds[j] = e
        return [torch.cat([e for (owner, _), e in zip(pieces, embeds) if owner == i]) for i in range(len(clips))]

    def new_stream(self) -> AudioStreamState:
        return AudioStreamState()

    def encode_chunk(self, state: AudioStreamState, pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        """Streaming embeddings (n_tokens, llm_hidden) of one chunk (<= 30 s), continuing `state`'s cache."""
        return self.encode_chunks([state], [pcm], sample_rate)[0]

    @torch.inference_mode()
    def encode_chunks(
        self, states: list[AudioStreamState], pcms: list[np.ndarray], sample_rate: int = SAMPLE_RATE
    ) -> list[torch.Tensor]:
        """`encode_chunk` for several streams in one forward (one chunk per stream; results equal solo calls).

        A stream whose cache plus the new chunk would reach the 1500 Whisper positions (30 s) starts over with an
        empty cache first, as upstream does. On any error the streams are left unchanged.
        """
        if len({id(s) for s in states}) != len(states):
            raise ValueError("a stream appears twice in one encode_chunks call; send its chunks in order instead")
        if len(states) != len(pcms):
            raise ValueError(f"{len(states)} stream states for {len(pcms)} chunks")
        chunks = [validate_pcm(p, sample_rate, PIECE_SECONDS) for p in pcms]
        feats = extract_features(self.extractor, chunks)
        mel_lens = feats.lengths.to(self.device)
        new_frames = encoder_frames(mel_lens)
        # Like upstream, a stream whose cache plus the chunk would reach the position limit starts a new cache.
        limit = self.model.max_positions
        restart = [0 < s.length and s.length + n >= limit for s, n in zip(states, new_frames.tolist())]
        caches = [DynamicCache() if r else s.cache for s, r in zip(states, restart)]
        lengths = [c.get_seq_length() for c in caches]
        try:
            hidden = self.model.encode_streaming(feats.features.to(self.device), mel_lens, caches)
        except BaseException:  # leave every stream as it was, so the caller can retry or go on
            for cache, n in zip(caches, lengths):
                _truncate(cache, n)
            raise
        for state, cache, r in zip(states, caches, restart):
            if r:
                state.cache, state.resets = cache, state.resets + 1
        return self.model.embed(hidden, new_frames)
