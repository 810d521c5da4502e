"""What every gateway request needs: the tokenizer and its special ids, the image processor settings, the
limits, the stages; and the two messages every LLM call is built from (prompt rows, sampling settings)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from protos.minicpmo.v1 import llm_pb2
from services.common.generation import SamplingParams
from services.common.image_layout import ImageProcessorConfig
from services.gateway.detokenize import IncrementalDetokenizer
from services.gateway.prompts import Prompt
from services.gateway.requests import InvalidRequest, Limits
from services.gateway.stages import RayStages
from services.gateway.tokenizer import SpecialTokens, load_tokenizer


@dataclass
class GatewayContext:
    tokenizer: object  # PreTrainedTokenizerFast
    special: SpecialTokens
    image_cfg: ImageProcessorConfig
    limits: Limits
    stages: RayStages

    @classmethod
    def from_model_dir(cls, model_dir: str, stages: RayStages, limits: Limits) -> GatewayContext:
        tokenizer = load_tokenizer(model_dir)
        special = SpecialTokens.from_tokenizer(tokenizer)
        return cls(tokenizer, special, ImageProcessorConfig.from_model_dir(model_dir), limits, stages)

    def detokenizer(self) -> IncrementalDetokenizer:
        """Answer text from ids. Control tokens (every added token: `<|im_end|>`, `<|tts_eos|>`, `<|interrupt|>`,
        ...) are never text; the ids themselves stay in the answer's `token_ids`."""
        return IncrementalDetokenizer(self.tokenizer, drop_ids=self.control_ids)

    @cached_property
    def control_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.get_added_vocab().values())


def prefill_input(prompt: Prompt, start: int = 0, end: int | None = None) -> llm_pb2.PrefillInput:
    """The prompt rows [start, end) with their placeholder spans (relative to `start`)."""
    end = len(prompt.input_ids) if end is None else end
    inp = llm_pb2.PrefillInput(input_ids=prompt.input_ids[start:end])
    for bounds, spans in ((prompt.image_bounds, inp.image_spans), (prompt.audio_bounds, inp.audio_spans)):
        for s, e in bounds:
            if start <= s and e <= end:
                spans.add(start=s - start, end=e - start)
            elif s < end and e > start:
                raise InvalidRequest("a placeholder straddles the prompt split")  # never happens for our splits
    return inp


def sampling_msg(p: SamplingParams) -> llm_pb2.SamplingParams:
    msg = llm_pb2.SamplingParams(
        greedy=p.greedy, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
        repetition_penalty=p.repetition_penalty, min_new_tokens=p.min_new_tokens, max_new_tokens=p.max_new_tokens,
    )  # fmt: skip
    if p.seed is not None:
        msg.seed = p.seed
    return msg
