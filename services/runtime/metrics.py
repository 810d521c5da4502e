"""Custom Prometheus metrics of the pipeline, exported the way Ray Serve exports custom metrics
(`ray.serve.metrics`: scraped from each node's metrics agent, tagged with deployment and replica).

Per-stage latency is recorded by every deployment (`stage` tag), the LLM engine's queue depth and KV use by
LLMCore (sampled every few seconds, idle or not), state rebuilds by the session-holding stages; the
answer-level metrics (time to first token / audio, speech real-time factor, active sessions) by the gateway.
Ray Serve's own series complement them: per-deployment queued and ongoing requests, replica counts, latencies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import contextmanager

from ray.serve.metrics import Counter, Gauge, Histogram

_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]

STAGE_LATENCY = Histogram(
    "minicpmo_stage_latency_s",
    description="Seconds one call of a pipeline stage took (encode, prefill, tts chunk, ...).",
    boundaries=_LATENCY_S,
    tag_keys=("stage",),
)
QUEUE_DEPTH = Gauge(
    "minicpmo_stage_queue_depth",
    description="Requests waiting in a stage replica (LLM: engine queue); reported every period, 0 when idle.",
    tag_keys=("stage",),
)
KV_TOKENS = Gauge(
    "minicpmo_kv_tokens",
    description="Tokens held in an LLMCore replica's KV cache, over all its sessions.",
)
KV_SESSIONS = Gauge(
    "minicpmo_kv_sessions",
    description="Sessions whose KV an LLMCore replica holds.",
)
KV_FREE_TOKENS = Gauge(
    "minicpmo_kv_free_tokens",
    description="Tokens of KV capacity an LLMCore replica has left.",
)
LIVE_SESSION_CAPACITY = Gauge(
    "minicpmo_live_session_capacity",
    description="Live sessions an LLMCore replica admits: its KV arena holds each at its token limit, with a "
    "context roll's room to spare (one more is refused RESOURCE_EXHAUSTED).",
)
SESSION_PLACEMENTS_REFUSED = Counter(
    "minicpmo_session_placements_refused_total",
    description="New live sessions an LLMCore or AudioEncoder replica had no room for, placed again under another "
    "id (a steady rise means the replicas are full: see minicpmo_live_session_capacity).",
)
TTFT = Histogram(
    "minicpmo_time_to_first_token_s",
    description="Seconds from request arrival at the gateway to the first answer token.",
    boundaries=_LATENCY_S,
)
TTFA = Histogram(
    "minicpmo_time_to_first_audio_s",
    description="Seconds from request arrival at the gateway to the first audio chunk.",
    boundaries=_LATENCY_S,
)
SPEECH_RTF = Histogram(
    "minicpmo_speech_rtf",
    description="Real-time factor of an answer's speech: wall seconds per second of audio (< 1 is faster than real time).",
    boundaries=[0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0],
)
ACTIVE_SESSIONS = Gauge(
    "minicpmo_active_sessions",
    description="Live sessions streaming through this gateway replica (closed and expired ones leave it).",
)
REQUESTS = Counter(
    "minicpmo_requests_total",
    description="Public RPCs received.",
    tag_keys=("rpc",),
)
ERRORS = Counter(
    "minicpmo_errors_total",
    description="Public RPCs that failed, by gRPC status code.",
    tag_keys=("rpc", "code"),
)
REBUILDS = Counter(
    "minicpmo_state_rebuilds_total",
    description="Session states rebuilt from a replay log (a replica took over a session it did not hold).",
    tag_keys=("stage",),
)
CONTEXT_ROLLS = Counter(
    "minicpmo_context_rolls_total",
    description="Live sessions' KV caches rolled to their context window (oldest units dropped).",
)
ANSWER_TOKENS = Counter("minicpmo_answer_tokens_total", description="Answer tokens streamed to clients.")


async def report_every(period_s: float, report: Callable[[], None]) -> None:
    """Call `report` every `period_s` seconds for the life of the replica (gauges stay current when idle)."""
    while True:
        report()
        await asyncio.sleep(period_s)


@contextmanager
def stage_timer(stage: str):
    """Record the wall time of the enclosed block as one call of `stage`."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        STAGE_LATENCY.observe(time.perf_counter() - t0, tags={"stage": stage})
