"""Which failures the SDK repeats (pure classification; the gateway-kill e2e test produces the real ones)."""

from __future__ import annotations

import grpc
import pytest

from services.client.sdk import retryable


class Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (grpc.StatusCode.UNAVAILABLE, "Redis is unavailable", True),
        # a gateway replica died under the call: HAProxy resets the stream, Serve's proxy names the actor
        (grpc.StatusCode.CANCELLED, "Stream removed (RST_STREAM (Received RST_STREAM with error code 8))", True),
        (grpc.StatusCode.INTERNAL, "ray.exceptions.ActorUnavailableError: Actor is unavailable", True),
        # the caller cancelled, or the server answered: not repeated
        (grpc.StatusCode.CANCELLED, "Locally cancelled by application!", False),
        (grpc.StatusCode.INTERNAL, "unexpected error", False),
        (grpc.StatusCode.INVALID_ARGUMENT, "audio sample rate must be 16000", False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "no free speech slot", False),
    ],
)
def test_only_a_lost_server_is_retried(code, details, expected):
    assert retryable(Failed(code, details)) is expected
