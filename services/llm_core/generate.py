"""Solo reference generation: one sequence, the model's own forward over a contiguous `SoloCache`, no batching.

This is the yardstick the engine's batched results are compared with (per-session results must equal a solo
run), and what the parity tests drive against upstream's `llm.generate`. Semantics as upstream: the prompt is
prefilled in one forward, each step's raw logits are kept, a stop id ends generation and is returned, and the
last chosen token is not fed back (so the cache holds prompt + all ids but the last, like `llm.generate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.common.generation import SamplingParams
from services.llm_core.model import LLMModel, SoloCache
from services.llm_core.sampling import NON_FINITE, NonFiniteScoresError, sample_next


@dataclass
class SoloResult:
    ids: list[int]  # generated ids, a final stop id included
    step_logits: torch.Tensor  # (len(ids), V) raw logits that chose each id
    prompt_hidden: torch.Tensor  # (T, D) last-layer hidden states of the prompt forward
    spk_hidden: torch.Tensor | None  # (D,) hidden state at `spk_position` of the prompt, if asked
    cache: SoloCache  # the sequence's KV: past + prompt + ids[:-1]
    stopped: bool  # ended on a stop id (False: max_new_tokens reached)


@torch.inference_mode()
def generate_solo(
    model: LLMModel,
    inputs_embeds: torch.Tensor,
    params: SamplingParams,
    stop_ids: Sequence[int],
    spk_position: int | None = None,
    cache: SoloCache | None = None,
    generator: torch.Generator | None = None,
    history: Sequence[int] = (),
) -> SoloResult:
    """Generate from `inputs_embeds` (T, D) appended to `cache` (a fresh one when None).

    `history` seeds the repetition-penalty window and min-new-tokens count (ids generated earlier in the same
    answer, for continuing a generation); `generator` defaults to `params.make_generator()`.
    """
    cache = cache if cache is not None else model.new_cache()
    generator = generator if generator is not None else params.make_generator(inputs_embeds.device)
    step_logits, hidden = model.step(inputs_embeds, cache, last_only=True)
    spk_hidden = hidden[spk_position].clone() if spk_position is not None else None
    generated = list(history)
    ids: list[int] = []
    all_logits: list[torch.Tensor] = []
    stops = set(stop_ids)
    stopped = False
    while True:
        all_logits.append(step_logits[0])
        next_id = int(sample_next(step_logits, params, [generated], [generator], stop_ids)[0])
        if next_id == NON_FINITE:
            raise NonFiniteScoresError("the model produced non-finite scores (NaN or inf logits) for this request")
        ids.append(next_id)
        generated.append(next_id)
        if next_id in stops:
            stopped = True
            break
        if len(ids) >= params.max_new_tokens:
            break
        step_logits, _ = model.step(model.embed_tokens(torch.tensor([next_id])), cache)
    return SoloResult(
        ids=ids,
        step_logits=torch.stack(all_logits),
        prompt_hidden=hidden,
        spk_hidden=spk_hidden,
        cache=cache,
        stopped=stopped,
    )
