"""One public RPC sent as-is (any message, any metadata) and what came back, judged against the API's promises.

The promise (protos/minicpmo/v1/omni.proto): every reply is OK or one of the documented statuses with a message a
person can act on; never INTERNAL or UNKNOWN, never a Python repr or a traceback.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import Message

from protos.minicpmo.v1 import omni_pb2_grpc
from services.client.sdk import Answer

STREAMING = frozenset({"Chat", "Respond"})
# What a caller may meet (UNAVAILABLE only while a stage is really down: the callers of `judge` decide that).
DOCUMENTED = frozenset({
    "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "PERMISSION_DENIED",
    "UNAUTHENTICATED", "UNAVAILABLE",
})  # fmt: skip
_PYTHON_LEAKS = (
    (re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>"), "a Python object repr"),
    (re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+"), "a traceback"),
    (re.compile(r"\bRay\w*Error\b|\bray\.exceptions\b"), "a Ray exception name"),
)


@dataclass
class Outcome:
    code: str  # grpc.StatusCode name, "OK" for a reply (or a stream) that ended normally
    message: str = ""
    reply: Message | None = None  # unary RPCs
    answer: Answer | None = None  # streaming RPCs
    seconds: float = 0.0
    events: list[str] = field(default_factory=list)  # kinds of the stream's events, in order

    @property
    def ok(self) -> bool:
        return self.code == "OK"


def metadata(api_key: str | None, session_id: str = "") -> list[tuple[str, str]]:
    """What the SDK sends; a session id that is no valid metadata value travels in the request only."""
    md = [("x-api-key", api_key)] if api_key is not None else []
    if session_id and session_id.isascii() and session_id.isprintable():
        md.append(("session_id", session_id))
    return md


def call(
    channel: grpc.Channel, rpc: str, request: Message, md: list[tuple[str, str]], timeout_s: float = 120.0
) -> Outcome:
    """Send one request to `minicpmo.v1.MiniCPMO/<rpc>` and collect the whole reply (every event of a stream)."""
    method = getattr(omni_pb2_grpc.MiniCPMOStub(channel), rpc)
    started = time.perf_counter()
    out = Outcome("OK")
    try:
        if rpc in STREAMING:
            out.answer = Answer.collect(
                method(request, metadata=md, timeout=timeout_s), lambda ev: out.events.append(ev.WhichOneof("event"))
            )
        else:
            out.reply = method(request, metadata=md, timeout=timeout_s)
    except grpc.RpcError as e:
        out.code, out.message = e.code().name, e.details() or ""
    out.seconds = time.perf_counter() - started
    return out


def message_problems(message: str) -> list[str]:
    """Why an error message would not help the caller (empty, a bare value, Python internals)."""
    if len(message.split()) < 2:
        return [f"message {message!r} says nothing a caller can act on"]
    return [f"message shows {what}: {message!r}" for pattern, what in _PYTHON_LEAKS if pattern.search(message)]


def judge(outcome: Outcome) -> list[str]:
    """The API promises this reply broke (empty when it kept them). UNAVAILABLE counts as kept here."""
    if outcome.ok:
        if outcome.answer is not None and (not outcome.events or outcome.events[-1] != "final"):
            return [f"stream ended without its final event (events: {outcome.events[-3:]})"]
        return []
    problems = [] if outcome.code in DOCUMENTED else [f"status {outcome.code} ({outcome.message!r})"]
    return problems + message_problems(outcome.message)
