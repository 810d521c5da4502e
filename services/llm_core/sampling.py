"""Next-token choice as upstream's `llm.generate` makes it (transformers 4.44 logits processors), one batched pass.

Order per row, as transformers applies it: repetition penalty over the ids generated so far, min-new-tokens (stop
ids masked), then for sampling temperature -> top-k -> top-p -> draw; greedy takes the argmax of the processed
logits. Each row has its own settings, held as (R,) tensors, so the scores never go through a per-row Python loop,
and nothing waits on the device until the caller reads the ids.

Batch independence: a sampled row draws exactly one uniform from its own generator (`SamplingParams.seed`) and
picks its token by inverse CDF over its filtered distribution, so a session samples the same ids whatever its
batch mates. Rows are filtered over their top-K candidates only (K = the largest top_k among the sampled rows;
positions past a row's own k get probability 0, so every cumulative sum is the one the row would get alone); a
row without top-k makes K the vocabulary size (a full sort).

Numerics: temperature scaling subtracts the row max first, so any valid temperature gives finite scaled logits
(the best candidate scores 0, its weight exp(0) = 1). A row whose logits are not all finite gets `NON_FINITE`
instead of an id; the caller fails that request only (`NonFiniteScoresError`).

Repetition-penalty window: when upstream generates from `inputs_embeds` (chat), the ids the penalty sees are the
generated ids only; the caller passes those as `generated_ids`. (`streaming_generate` restarts `llm.generate`
every 3 tokens with `input_ids`, so its window is that call's input ids plus its new ids; we use the answer's
generated ids for both, which differs only when sampling with a penalty.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from services.common.generation import SamplingError, SamplingParams
from services.common.sampling import inverse_cdf
from services.runtime.errors import Internal

NON_FINITE = -1  # the id `sample_next` returns for a row whose logits were not all finite


class NonFiniteScoresError(Internal):
    """The model produced non-finite scores (NaN or inf logits) for this request; other requests are unaffected."""


def history_tensor(generated_ids: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    """(R, longest history) ids, short rows padded with `pad`."""
    width = max(1, max(len(g) for g in generated_ids))
    rows = [[*g, *([pad] * (width - len(g)))] for g in generated_ids]
    return torch.tensor(rows, dtype=torch.long, device=device)


def apply_repetition_penalty(scores: torch.Tensor, history: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """scores (R, V) with the logits of each row's seen ids divided by its penalty if > 0, multiplied if < 0.

    `history` (R, L) holds the seen ids, padded with V (a scratch column, dropped); repeats are harmless.
    """
    vocab = scores.shape[1]
    padded = F.pad(scores, (0, 1))
    seen = padded.gather(1, history)
    p = penalty[:, None]
    padded.scatter_(1, history, torch.where(seen < 0, seen * p, seen / p))
    return padded[:, :vocab]


def candidates(
    scores: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's sampling candidates: scaled scores (S, K) in descending order with the ones top-k or top-p remove
    at -inf, and their vocabulary ids (S, K). `top_k` (S,) in 1..V (V = no top-k), K = its max.

    Top-k keeps ties with the k-th value that fall inside the K window (transformers removes `scores < kth`);
    top-p removes the low tail whose cumulative probability in ascending order stays <= 1 - top_p, always keeping
    the best candidate.
    """
    k_max = int(top_k.max())
    scaled = (scores - scores.max(-1, keepdim=True).values) / temperature[:, None]
    vals, ids = torch.topk(scaled, k_max)
    kth = vals.gather(1, (top_k - 1)[:, None])
    vals = vals.masked_fill(vals < kth, -torch.inf)
    weights = vals.exp()
    tail = weights.flip(-1).cumsum(-1).flip(-1)  # probability mass (unnormalised) of each candidate and all below it
    remove = tail <= (1 - top_p[:, None]) * tail[:, :1]
    remove[:, 0] = False
    return vals.masked_fill(remove, -torch.inf), ids


def draw(vals: torch.Tensor, ids: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF pick per row from candidates (`candidates`' output) with one uniform in [0, 1) each."""
    return ids.gather(1, inverse_cdf(vals.exp(), uniforms)[:, None])[:, 0]


def uniforms(gens: Sequence[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One uniform per row: from the row's own generator, or (unseeded rows) all at once from the global RNG."""
    out = torch.rand(len(gens), device=device)
    for i, g in enumerate(gens):
        if g is not None:
            out[i] = torch.rand((), generator=g, device=device)
    return out


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    generated_ids: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None] | None = None,
    stop_ids: Sequence[int] | Sequence[Sequence[int]] = (),
) -> torch.Tensor:
    """Next token per row: `logits` (R, V) raw, `params` one for all rows or one per row, `generated_ids[r]` the
    ids row r generated so far (penalty window and min-new-tokens count), `generators[r]` its RNG (from
    `SamplingParams.make_generator`, kept by the caller across steps), `stop_ids` the ids masked while fewer
    than `min_new_tokens` were generated (one list for all rows, or one per row). Returns (R,) int64 on the
    logits' device: an id, or NON_FINITE.
    """
    R, V = logits.shape
    rows = [params] * R if isinstance(params, SamplingParams) else list(params)
    if len(rows) != R or len(generated_ids) != R:
        raise SamplingError(f"{R} logits rows but {len(rows)} params and {len(generated_ids)} histories")
    gens = list(generators) if generators is not None else [None] * R
    dev = logits.device
    as_tensor = lambda xs, dtype=torch.float32: torch.tensor(xs, dtype=dtype, device=dev)
    low, high = torch.aminmax(logits, dim=-1)
    finite = torch.isfinite(low) & torch.isfinite(high)  # NaN and inf reach the row's min or max
    # A broken row computes garbage on its own (every op here is row-wise) and is replaced at the end.
    scores = logits.float()
    if any(p.repetition_penalty != 1.0 and g for p, g in zip(rows, generated_ids)):
        penalty = as_tensor([p.repetition_penalty for p in rows])
        scores = apply_repetition_penalty(scores, history_tensor(generated_ids, V, dev), penalty)
    shared = not len(stop_ids) or isinstance(stop_ids[0], int)
    stops = [stop_ids] * R if shared else stop_ids
    masked = [(r, s) for r, (p, g) in enumerate(zip(rows, generated_ids)) if len(g) < p.min_new_tokens for s in stops[r]]
    if masked:
        scores = scores.clone() if scores is logits else scores
        at = as_tensor(masked, torch.long)
        scores[at[:, 0], at[:, 1]] = -torch.inf
    sampled = [r for r, p in enumerate(rows) if not p.greedy]
    out = scores.argmax(-1) if len(sampled) < R else torch.empty(R, dtype=torch.long, device=dev)
    if sampled:
        sel = as_tensor(sampled, torch.long)
        ps = [rows[r] for r in sampled]
        vals, ids = candidates(
            scores if len(sampled) == R else scores[sel],
            as_tensor([p.temperature for p in ps]),
            as_tensor([p.top_k if 0 < p.top_k < V else V for p in ps], torch.long),
            as_tensor([p.top_p for p in ps]),
        )
        out[sel] = draw(vals, ids, uniforms([gens[r] for r in sampled], dev))
    return torch.where(finite, out, NON_FINITE)
