"""Sampling: our batched implementation against transformers' own logits processors (what upstream runs), batch
independence of seeded rows, and rows with non-finite logits."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from services.common.generation import (
    CHAT_DEFAULTS,
    GREEDY,
    MAX_TEMPERATURE,
    STREAMING_DEFAULTS,
    SamplingError,
    SamplingParams,
)
from services.llm_core.sampling import (
    NON_FINITE,
    apply_repetition_penalty,
    candidates,
    sample_next,
)


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


def our_filtered(logits: torch.Tensor, params: SamplingParams, generated: list[int]) -> torch.Tensor:
    """One row through our penalty and candidate filter, scattered back to the whole vocabulary (-inf elsewhere)."""
    V = logits.shape[-1]
    scores = apply_repetition_penalty(logits[None], torch.tensor([generated]), torch.tensor([params.repetition_penalty]))
    top_k = params.top_k if 0 < params.top_k < V else V
    vals, ids = candidates(
        scores, torch.tensor([params.temperature]), torch.tensor([top_k]), torch.tensor([params.top_p])
    )
    return torch.full((V,), -torch.inf).scatter(0, ids[0], vals[0])


@pytest.mark.parametrize("top_k,top_p", [(100, 0.8), (5, 1.0), (0, 0.5), (1, 0.8), (40, 0.95), (0, 1.0)])
def test_filtered_distribution_equals_transformers(top_k, top_p):
    """Same candidates kept, same probabilities (our scores are shifted by the row max: compare after softmax)."""
    g = torch.Generator().manual_seed(top_k)
    logits = torch.randn(500, generator=g) * 3
    params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p, repetition_penalty=1.05)
    history = [3, 7, 7, 42]
    ours = our_filtered(logits, params, history)
    ref = hf_processed(logits, params, history)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1), rtol=1e-5, atol=1e-7)


def test_repetition_penalty_signs_and_repeats():
    rows = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    history = torch.tensor([[0, 1, 1], [2, 3, 3]])  # row 1: one seen id, padded with V = 3
    out = apply_repetition_penalty(rows, history, torch.tensor([2.0, 4.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0], [2.0, -2.0, 0.25]]


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


def test_seeded_rows_with_different_settings_sample_as_alone():
    """Rows with their own top_k / top_p / temperature / penalty (so the batch's candidate window is wider than a
    row's own) draw exactly the ids they draw alone, step after step."""
    g = torch.Generator().manual_seed(2)
    params = [
        SamplingParams(seed=1, top_k=5, top_p=0.9),
        SamplingParams(seed=2, top_k=200, top_p=0.5, temperature=1.3),
        SamplingParams(seed=3, top_k=0, top_p=0.95, repetition_penalty=1.3),
        GREEDY.with_(repetition_penalty=1.2),
        SamplingParams(seed=4, top_k=50, temperature=0.05),
    ]
    steps = [torch.randn(len(params), 400, generator=g) * 4 for _ in range(6)]
    gens = [p.make_generator() for p in params]
    batched, histories = [], [[] for _ in params]
    for logits in steps:
        ids = sample_next(logits, params, histories, gens).tolist()
        batched.append(ids)
        for h, i in zip(histories, ids):
            h.append(i)
    for b, p in enumerate(params):
        gen, history = p.make_generator(), []
        for step, logits in enumerate(steps):
            history.append(sample_next(logits[b : b + 1], p, [list(history)], [gen]).item())
            assert history[-1] == batched[step][b], (b, step)


def test_min_new_tokens_with_stop_ids_per_row():
    logits = torch.tensor([[5.0, 4.0, 0.0], [5.0, 4.0, 0.0]])
    params = GREEDY.with_(min_new_tokens=1)
    assert sample_next(logits, params, [[], []], stop_ids=[[0], [1]]).tolist() == [1, 0]
    assert sample_next(logits, params, [[], [2]], stop_ids=[[0], [0]]).tolist() == [1, 0]


def test_a_row_with_non_finite_logits_fails_alone():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 50, generator=g)
    params = [SamplingParams(seed=i) for i in range(3)] + [GREEDY]
    clean = sample_next(logits, params, [[]] * 4, [p.make_generator() for p in params])
    broken = logits.clone()
    broken[1, 7] = float("nan")
    broken[3, 0] = float("inf")
    out = sample_next(broken, params, [[]] * 4, [p.make_generator() for p in params])
    assert out.tolist() == [clean[0].item(), NON_FINITE, clean[2].item(), NON_FINITE]


@pytest.mark.parametrize("temperature", [1e-30, 1e-6, 0.7, MAX_TEMPERATURE])
def test_any_valid_temperature_gives_finite_scaled_scores(temperature):
    """Scores are shifted by the row max before the division: the best candidate scores exactly 0 and nothing is
    NaN even at extreme logits and temperatures (an unshifted 3e38 / 1e-30 would be inf, and inf - inf NaN)."""
    logits = torch.tensor([[3e38, -3e38, 1e38, 0.0]])
    vals, ids = candidates(logits, torch.tensor([temperature]), torch.tensor([4]), torch.tensor([1.0]))
    assert vals[0, 0] == 0 and ids[0, 0] == 0 and not vals.isnan().any()
    params = SamplingParams(temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=0)
    assert sample_next(logits, params, [[]], [params.make_generator()]).item() == 0


@pytest.mark.parametrize(
    "kw", [{"temperature": 0.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"max_new_tokens": 0}]
)
def test_bad_params_are_rejected(kw):
    with pytest.raises(SamplingError):
        SamplingParams(**kw)


def test_batch_size_mismatch_is_an_error():
    with pytest.raises(SamplingError):
        sample_next(torch.zeros(2, 5), [GREEDY], [[], []])
