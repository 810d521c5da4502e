"""Next-token choice as upstream's `llm.generate` makes it (transformers 4.44 logits processors), batched.

Order per row, as transformers applies it: repetition penalty over the ids generated so far, min-new-tokens
(stop ids masked), then for sampling temperature -> top-k -> top-p -> multinomial; greedy takes the argmax of
the processed logits. Each row may have its own params and its own seeded generator, so sessions batched into
one forward pass still sample exactly as they would alone.

Repetition-penalty window: when upstream generates from `inputs_embeds` (chat), the ids the penalty sees are
the generated ids only; the caller passes those as `generated_ids`. (`streaming_generate` restarts
`llm.generate` every 3 tokens with `input_ids`, so its window is that call's input ids plus its new ids; we use
the answer's generated ids for both, which differs only when sampling with a penalty.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.common.generation import SamplingError, SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, ids: Sequence[int], penalty: float) -> None:
    """In place on one row (V,): logits of seen ids are divided by `penalty` if > 0, multiplied if < 0."""
    if penalty == 1.0 or len(ids) == 0:
        return
    idx = torch.as_tensor(list(ids), dtype=torch.long, device=logits.device)
    seen = logits.gather(0, idx)
    logits.scatter_(0, idx, torch.where(seen < 0, seen * penalty, seen / penalty))


def top_k_top_p_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """One row (V,) of temperature-scaled logits with everything outside top-k, then top-p, set to -inf.

    Ties at the k-th value are kept (transformers' `scores < kth`); top-p removes the low tail whose cumulative
    probability (ascending order) stays <= 1 - top_p, always keeping the most likely token.
    """
    out = logits
    if 0 < top_k < out.shape[-1]:
        kth = torch.topk(out, top_k).values[-1]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(out, descending=False)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
        remove[-1] = False
        out = out.masked_fill(remove.scatter(0, sorted_idx, remove), float("-inf"))
    return out


def _sample_rows(
    scaled: torch.Tensor, params: Sequence[SamplingParams], gens: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Sample one id per row of temperature-scaled logits (R, V).

    Rows with a top-k work on their top-k candidates only (same distribution as filtering the whole vocabulary,
    since everything outside top-k has probability 0) so a batch of 64 rows never sorts 64 full vocabularies.
    """
    R, V = scaled.shape
    out = torch.empty(R, dtype=torch.long, device=scaled.device)
    k_max = max((p.top_k for p in params if 0 < p.top_k < V), default=0)
    cand_vals, cand_idx = torch.topk(scaled, k_max) if k_max else (None, None)
    for r, p in enumerate(params):
        if 0 < p.top_k < V:
            vals, idx = cand_vals[r], cand_idx[r]
            # keep ties with the k-th value that fall inside the candidate window, as `scores < kth` would
            vals = vals.masked_fill(vals < vals[p.top_k - 1], float("-inf"))
        else:
            vals, idx = scaled[r], None
        probs = top_k_top_p_filter(vals, 0, p.top_p).softmax(-1)
        pick = torch.multinomial(probs, 1, generator=gens[r])[0]
        out[r] = idx[pick] if idx is not None else pick
    return out


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    generated_ids: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None] | None = None,
    stop_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Next token per row: `logits` (B, V) raw, `params` one for all rows or one per row, `generated_ids[b]` the
    ids row b generated so far (penalty window and min-new-tokens count), `generators[b]` its RNG (from
    `SamplingParams.make_generator`, kept by the caller across steps), `stop_ids` the ids masked while fewer
    than `min_new_tokens` were generated. Returns (B,) int64 on the logits' device.
    """
    B = logits.shape[0]
    per_row = [params] * B if isinstance(params, SamplingParams) else list(params)
    if len(per_row) != B or len(generated_ids) != B:
        raise SamplingError(f"{B} logits rows but {len(per_row)} params and {len(generated_ids)} histories")
    gens = list(generators) if generators is not None else [None] * B
    scores = logits.float().clone()
    for b, p in enumerate(per_row):
        apply_repetition_penalty(scores[b], generated_ids[b], p.repetition_penalty)
        if len(generated_ids[b]) < p.min_new_tokens and len(stop_ids):
            scores[b, list(stop_ids)] = float("-inf")
    out = scores.argmax(-1)
    sampled = [b for b, p in enumerate(per_row) if not p.greedy]
    if sampled:
        temps = torch.tensor([per_row[b].temperature for b in sampled], device=scores.device).unsqueeze(1)
        out[sampled] = _sample_rows(
            scores[sampled] / temps, [per_row[b] for b in sampled], [gens[b] for b in sampled]
        )
    return out
