"""The speech decoder's batched code sampler against upstream's per-utterance chain (temperature per codebook,
transformers' top-p then top-k, eos mask), its inverse-CDF draw, and the independence of seeded rows."""

from __future__ import annotations

import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from services.common.config import TTSConfig
from services.common.sampling import inverse_cdf
from services.tts_decoder.sampler import CodeSampler

CFG = TTSConfig()
EOS = CFG.num_audio_tokens - 1
V = CFG.num_audio_tokens


def random_logits(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, CFG.num_vq, V, generator=torch.Generator().manual_seed(seed)) * 0.3


def upstream_scores(logits: torch.Tensor, step: int, bos: bool) -> torch.Tensor:
    """One utterance's step as upstream `ConditionalChatTTS.generate` computes it: (num_vq, V) -> (num_vq, V)."""
    logits = logits / torch.tensor([0.1, 0.3, 0.1, 0.3])[:, None]
    if not bos:
        logits = TopPLogitsWarper(0.7, min_tokens_to_keep=3)(None, logits)
        logits = TopKLogitsWarper(20, min_tokens_to_keep=3)(None, logits)
    if step < 10:
        logits[:, EOS] = -torch.inf
    return logits


def test_scores_equal_upstream_per_row_with_bos_rows_left_unfiltered():
    sampler = CodeSampler(CFG, EOS)
    logits = random_logits(5, 0)
    bos = [False, True, False, False, True]
    for step in (0, 9, 10, 24):
        batched = sampler.scores(logits, step, bos)
        for row in range(5):
            assert torch.equal(batched[row], upstream_scores(logits[row], step, bos[row]))
    kept = torch.isfinite(sampler.scores(logits, 10, bos)).sum(-1)
    assert (kept[[0, 2, 3]] <= 20).all() and (kept[[0, 2, 3]] >= 3).all()
    assert (kept[[1, 4]] == V).all()


def test_force_no_stop_masks_eos_at_every_step():
    sampler = CodeSampler(CFG, EOS, force_no_stop=True)
    logits = random_logits(2, 1)
    logits[..., EOS] = 50.0  # eos would be the only candidate left
    assert torch.isneginf(sampler.scores(logits, 20, [False, False])[..., EOS]).all()
    codes = sampler(logits, 20, [False, False], [True, False], [None, torch.Generator().manual_seed(0)])
    assert not (codes == EOS).any()


def test_inverse_cdf_draws_each_code_with_its_probability_and_never_a_removed_one():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]])
    n = 10_000
    grid = (torch.arange(n) + 0.5) / n  # evenly spread uniforms: counts are the probabilities exactly
    picks = inverse_cdf(probs.expand(n, -1), grid)
    counts = torch.bincount(picks.flatten(), minlength=6) / n
    torch.testing.assert_close(counts, probs[0], atol=1.0 / n, rtol=0)
    assert not counts[probs[0] == 0].any()
    largest_uniform = torch.tensor([1.0 - 2**-24])  # torch.rand's largest float32 value
    assert inverse_cdf(probs, largest_uniform).item() == 4  # the last code with mass, not the zero tail


def test_greedy_rows_take_the_argmax_and_draw_nothing():
    sampler = CodeSampler(CFG, EOS)
    logits = random_logits(2, 2)
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    codes = sampler(logits, 12, [False, False], [True, True], [gen, None])
    assert torch.equal(codes, sampler.scores(logits, 12, [False, False]).argmax(-1))
    assert torch.equal(gen.get_state(), state)


def test_seeded_row_codes_do_not_depend_on_batch_mates():
    sampler = CodeSampler(CFG, EOS)
    steps = [random_logits(4, 10 + s) for s in range(12)]

    def run(rows: list[int], greedy: list[bool], seeds: list[int | None]) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(s) if s is not None else None for s in seeds]
        return torch.stack([sampler(lg[rows], s, [s == 0] * len(rows), greedy, gens) for s, lg in enumerate(steps)])

    alone = run([2], [False], [7])
    together = run([0, 2, 3, 1], [False, False, True, False], [1, 7, None, None])
    assert torch.equal(together[:, 1], alone[:, 0])
    assert not torch.equal(together[:, 0], together[:, 1])  # different seeds, different codes
