"""Continuous-batching LLM engine: per-session KV in one arena, batched prefill + decode steps."""

from services.llm_core.engine.engine import (
    ContextLengthError,
    EngineFullError,
    EngineInputError,
    GenEvent,
    LLMEngine,
    NonFiniteScoresError,
    NumericsCheckError,
    PrefillResult,
    SessionBusyError,
    SessionDroppedError,
    SessionStateError,
)

__all__ = [
    "ContextLengthError",
    "EngineFullError",
    "EngineInputError",
    "GenEvent",
    "LLMEngine",
    "NonFiniteScoresError",
    "NumericsCheckError",
    "PrefillResult",
    "SessionBusyError",
    "SessionDroppedError",
    "SessionStateError",
]
