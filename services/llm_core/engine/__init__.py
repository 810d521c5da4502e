"""Continuous-batching LLM engine: pooled per-session KV, batched prefill + decode steps."""

from services.llm_core.engine.engine import (
    ContextLengthError,
    EngineFullError,
    EngineInputError,
    GenEvent,
    LLMEngine,
    PrefillResult,
    SessionDroppedError,
    SessionStateError,
)

__all__ = [
    "ContextLengthError",
    "EngineFullError",
    "EngineInputError",
    "GenEvent",
    "LLMEngine",
    "PrefillResult",
    "SessionDroppedError",
    "SessionStateError",
]
