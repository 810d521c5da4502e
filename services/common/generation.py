"""Generation settings of one answer (`SamplingParams`), upstream's defaults, and their validation.

Shared by the gateway (which turns public options into these and refuses bad ones before any stage runs) and
LLMCore (whose sampler applies them). Every field is checked here, once: a NaN or infinite temperature, a
top_p outside (0, 1], a negative top_k, a non-positive penalty or min > max never reach a sampler, where they
would turn a batch's probabilities into NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from services.runtime.errors import InvalidArgument

MAX_TEMPERATURE = 100.0  # far past anything useful (upstream uses 0.7); keeps scaled logits finite
MAX_REPETITION_PENALTY = 100.0


class SamplingError(InvalidArgument):
    """Sampling settings a caller can fix (out-of-range temperature, top_p, ...)."""


def _finite_in(name: str, value: float, low: float, high: float, low_open: bool = True) -> None:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise SamplingError(f"{name} must be a finite number in {bracket}{low:g}, {high:g}] (got {value})")


@dataclass(frozen=True)
class SamplingParams:
    """Upstream `chat` / `streaming_generate` defaults (sampling=True): top_p 0.8, top_k 100, temperature 0.7,
    repetition_penalty 1.05, min_new_tokens 0. `greedy` is upstream's `do_sample=False` with num_beams 1.

    `max_new_tokens` defaults to `chat`'s 2048 (`streaming_generate` uses 512: see STREAMING_DEFAULTS).
    `seed` seeds this request's own generator (None: nondeterministic).
    """

    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 100
    repetition_penalty: float = 1.05
    min_new_tokens: int = 0
    max_new_tokens: int = 2048
    greedy: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        _finite_in("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _finite_in("top_p", self.top_p, 0.0, 1.0)
        _finite_in("repetition_penalty", self.repetition_penalty, 0.0, MAX_REPETITION_PENALTY)
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 disables it; got {self.top_k})")
        if self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise SamplingError(
                f"min_new_tokens must be in 0..max_new_tokens ({self.max_new_tokens}); got {self.min_new_tokens}"
            )

    def with_(self, **changes) -> "SamplingParams":
        return replace(self, **changes)

    def make_generator(self, device: str | torch.device = "cpu") -> torch.Generator | None:
        """The per-request generator (None when unseeded: the global RNG is used)."""
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g


CHAT_DEFAULTS = SamplingParams()
STREAMING_DEFAULTS = SamplingParams(max_new_tokens=512)
# What the golden greedy runs use: no penalty (upstream needs repetition_penalty=1.0 passed explicitly).
GREEDY = SamplingParams(greedy=True, repetition_penalty=1.0)
