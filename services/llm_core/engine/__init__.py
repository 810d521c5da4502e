"""Continuous-batching LLM engine: per-session KV in one arena, batched prefill + decode steps.

The package's public names, wherever they are defined (its errors come from the scheduler, the KV arena and the
sampler too)."""

from services.llm_core.engine.engine import (
    EngineInputError,
    GenEvent,
    LLMEngine,
    NumericsCheckError,
    PrefillResult,
    SessionBusyError,
    SessionDroppedError,
)
from services.llm_core.engine.kv_cache import EngineFullError, Reservation
from services.llm_core.engine.scheduler import EXISTING, ContextLengthError, SessionStateError
from services.llm_core.sampling import NonFiniteScoresError

__all__ = [
    "ContextLengthError",
    "EXISTING",
    "EngineFullError",
    "EngineInputError",
    "GenEvent",
    "LLMEngine",
    "NonFiniteScoresError",
    "NumericsCheckError",
    "PrefillResult",
    "Reservation",
    "SessionBusyError",
    "SessionDroppedError",
    "SessionStateError",
]
