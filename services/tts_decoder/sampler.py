"""Upstream's code choice for one generation step of every segment at once.

Per row (a segment) and codebook: logits / temperature [0.1, 0.3, 0.1, 0.3], top-p 0.7 then top-k 20 (both keep at
least 3; skipped on a segment's [Ptts] step), eos masked for the first 10 steps of every generate call, then a
multinomial draw, or argmax for greedy rows. The draw is an inverse CDF over one uniform per codebook taken from the
row's own generator, so a seeded utterance gets the same codes whatever rows share its steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import TopKLogitsWarper, TopPLogitsWarper

from services.common.config import TTSConfig
from services.common.sampling import inverse_cdf

TEMPERATURES = (0.1, 0.3, 0.1, 0.3)
MIN_TOKENS_TO_KEEP = 3
MIN_NEW_TOKENS = 10  # eos is masked for the first 10 steps of EVERY generate call (upstream quirk)


class CodeSampler:
    def __init__(self, cfg: TTSConfig, eos_id: int, force_no_stop: bool = False):
        if cfg.repetition_penalty != 1.0:
            raise NotImplementedError("upstream runs the TTS with repetition_penalty 1.0 (processor off)")
        self.eos_id = eos_id
        self.num_vq = cfg.num_vq
        self.force_no_stop = force_no_stop  # upstream's `force_no_stop`: eos never sampled (fixed-length benches)
        self.warpers = [TopPLogitsWarper(cfg.top_p, min_tokens_to_keep=MIN_TOKENS_TO_KEEP),
                        TopKLogitsWarper(cfg.top_k, min_tokens_to_keep=MIN_TOKENS_TO_KEEP)]
        self.temperatures = torch.tensor(TEMPERATURES, dtype=torch.float32)[:, None]

    def __call__(self, logits: torch.Tensor, step_in_call: int, bos: list[bool], greedy: list[bool],
                 generators: list[torch.Generator | None]) -> torch.Tensor:
        """logits (B, num_vq, V) float32 -> codes (B, num_vq) int64 on the logits' device.

        bos: the row's [Ptts] step; generators: per row, None draws from torch's default one."""
        scores = self.scores(logits, step_in_call, bos)
        codes = inverse_cdf(F.softmax(scores, dim=-1), self._uniforms(greedy, generators).to(logits.device))
        if any(greedy):
            codes = torch.where(torch.tensor(greedy, device=logits.device)[:, None], scores.argmax(-1), codes)
        return codes

    def scores(self, logits: torch.Tensor, step_in_call: int, bos: list[bool]) -> torch.Tensor:
        """What upstream samples from, per row: scaled logits after top-p/top-k (not on a [Ptts] step) and the
        eos mask, removed entries at -inf."""
        logits = logits / self.temperatures.to(logits.device)
        if not all(bos):
            warped = logits.flatten(0, 1)
            for warp in self.warpers:  # row-wise, so all rows go through at once
                warped = warp(None, warped)
            warped = warped.view_as(logits)
            if any(bos):
                keep = torch.tensor(bos, device=logits.device)[:, None, None]
                warped = torch.where(keep, logits, warped)
            logits = warped
        if step_in_call < MIN_NEW_TOKENS or self.force_no_stop:
            logits[..., self.eos_id] = -torch.inf
        return logits

    def _uniforms(self, greedy: list[bool], generators: list[torch.Generator | None]) -> torch.Tensor:
        """(B, num_vq) draws in [0, 1): greedy rows draw nothing, so no row's stream depends on its batch mates."""
        draws = [torch.zeros(self.num_vq) if g else torch.rand(self.num_vq, generator=gen)
                 for g, gen in zip(greedy, generators)]
        return torch.stack(draws)

