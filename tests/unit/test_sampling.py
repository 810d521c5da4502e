"""Sampling: our batched implementation against transformers' own logits processors (what upstream runs)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from services.common.generation import CHAT_DEFAULTS, GREEDY, STREAMING_DEFAULTS, SamplingError, SamplingParams
from services.llm_core.sampling import apply_repetition_penalty, sample_next, top_k_top_p_filter


def hf_processed(logits: torch.Tensor, params: SamplingParams, generated: list[int]) -> torch.Tensor:
    """One row through transformers' processors in generate's order (penalty, temperature, top-k, top-p)."""
    ids = torch.tensor([generated], dtype=torch.long)
    scores = logits.unsqueeze(0).clone()
    scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, scores)
    scores = TemperatureLogitsWarper(params.temperature)(ids, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(ids, scores)
    scores = TopPLogitsWarper(params.top_p)(ids, scores)
    return scores[0]


def test_upstream_defaults():
    assert (CHAT_DEFAULTS.top_p, CHAT_DEFAULTS.top_k, CHAT_DEFAULTS.temperature) == (0.8, 100, 0.7)
    assert CHAT_DEFAULTS.repetition_penalty == 1.05 and not CHAT_DEFAULTS.greedy
    assert STREAMING_DEFAULTS.max_new_tokens == 512 and CHAT_DEFAULTS.max_new_tokens == 2048


@pytest.mark.parametrize("top_k,top_p", [(100, 0.8), (5, 1.0), (0, 0.5), (1, 0.8), (40, 0.95)])
def test_filter_equals_transformers(top_k, top_p):
    g = torch.Generator().manual_seed(top_k)
    logits = torch.randn(500, generator=g) * 3
    params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p, repetition_penalty=1.05)
    history = [3, 7, 7, 42]
    ours = logits.clone()
    apply_repetition_penalty(ours, history, params.repetition_penalty)
    ours = top_k_top_p_filter(ours / params.temperature, top_k, top_p)
    assert torch.equal(ours, hf_processed(logits, params, history))


def test_repetition_penalty_signs():
    row = torch.tensor([2.0, -2.0, 1.0])
    apply_repetition_penalty(row, [0, 1], 2.0)
    assert row.tolist() == [1.0, -4.0, 1.0]


def test_greedy_is_argmax_after_penalty():
    logits = torch.tensor([[1.0, 0.9, 0.1]])
    assert sample_next(logits, GREEDY, [[]]).tolist() == [0]
    assert sample_next(logits, GREEDY.with_(repetition_penalty=2.0), [[0]]).tolist() == [1]


def test_min_new_tokens_masks_stop_ids():
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    params = GREEDY.with_(min_new_tokens=2)
    assert sample_next(logits, params, [[1]], stop_ids=[0]).tolist() == [1]
    assert sample_next(logits, params, [[1, 1]], stop_ids=[0]).tolist() == [0]


def test_sampling_support_and_frequencies_match_transformers():
    """Sampled ids stay in transformers' support and follow its probabilities."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=g) * 2
    params = SamplingParams(top_k=10, top_p=0.9, temperature=0.7, repetition_penalty=1.05, seed=123)
    probs = hf_processed(logits[0], params, [1, 2]).softmax(-1)
    gen = params.make_generator()
    n = 4000
    counts = torch.zeros(50)
    for _ in range(n):
        counts[sample_next(logits, params, [[1, 2]], [gen])[0]] += 1
    assert (counts[probs == 0] == 0).all()
    assert (counts / n - probs).abs().max() < 0.03


def test_seeded_rows_are_independent_of_the_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 300, generator=g)
    params = [SamplingParams(seed=s) for s in (1, 2, 3)]
    gens = [p.make_generator() for p in params]
    batched = [sample_next(logits, params, [[], [], []], gens).tolist() for _ in range(5)]
    for b, p in enumerate(params):
        gen = p.make_generator()
        solo = [sample_next(logits[b : b + 1], p, [[]], [gen]).item() for _ in range(5)]
        assert solo == [row[b] for row in batched]


def test_top_k_one_is_greedy_whatever_the_seed():
    logits = torch.randn(4, 100)
    out = sample_next(logits, SamplingParams(top_k=1, seed=9), [[]] * 4, [None] * 4)
    assert torch.equal(out, logits.argmax(-1))


def test_mixed_greedy_and_sampled_rows():
    logits = torch.randn(2, 100)
    out = sample_next(logits, [GREEDY, SamplingParams(top_k=1)], [[], []])
    assert torch.equal(out, logits.argmax(-1))


@pytest.mark.parametrize(
    "kw", [dict(temperature=0.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(max_new_tokens=0)]
)
def test_bad_params_are_rejected(kw):
    with pytest.raises(SamplingError):
        SamplingParams(**kw)


def test_batch_size_mismatch_is_an_error():
    with pytest.raises(SamplingError):
        sample_next(torch.zeros(2, 5), [GREEDY], [[], []])
