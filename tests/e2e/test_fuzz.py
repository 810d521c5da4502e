"""Property-based fuzzing of the public API (hypothesis, `tests/fuzz/`): random ChatRequest, CreateSession,
AppendUnit and Respond requests - extreme floats, out-of-range enums, huge repeated fields, random media bytes,
control tokens in text - sent while another API key's greedy chats run alongside.

Properties: every reply is OK or a documented status with a message a person can act on (never INTERNAL or
UNKNOWN); calls without a valid key are UNAUTHENTICATED; no replica restarts; the other key's chats get exactly
their answers alone and its session is untouched. A bounded, derandomized run here; `make fuzz` runs a long one.
"""

from __future__ import annotations

import pytest

from tests.fuzz.harness import run_campaign

pytestmark = [pytest.mark.ray, pytest.mark.redis, pytest.mark.slow]

EXAMPLES = 60


def test_random_requests_keep_the_api_promises(served):
    report = run_campaign(served, EXAMPLES)
    print(report.summary())
    assert report.examples == EXAMPLES
    valid = sum(per_rpc["OK"] for per_rpc in report.statuses.values())
    assert valid > 0, "no case was valid: the strategies only probe refusals"
    assert report.innocent_answers > 0
    assert report.clean, report.summary()
