"""The stages' autoscaling policy (pure: a Serve AutoscalingContext in, the replicas it asks for out)."""

from __future__ import annotations

import pytest
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from services.runtime.autoscaling import SESSION_LOAD, SessionLoadPolicy, replicas_for
from services.runtime.direct import DIRECT_ONGOING


def context(replicas: int, requests: float, loads: list[float] | None, direct: list[float] = ()) -> AutoscalingContext:
    config = AutoscalingConfig(min_replicas=1, max_replicas=16, target_ongoing_requests=10)
    metrics = None if loads is None else {SESSION_LOAD: {f"replica-{i}": load for i, load in enumerate(loads)}}
    if direct:
        metrics = {**(metrics or {}), DIRECT_ONGOING: {f"replica-{i}": n for i, n in enumerate(direct)}}
    return AutoscalingContext(
        deployment_id=None, deployment_name="LLMCore", app_name="minicpmo", current_num_replicas=replicas,
        target_num_replicas=replicas, running_replicas=[], total_num_requests=requests, total_queued_requests=0,
        aggregated_metrics=metrics, raw_metrics=None, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=16, policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=0.0, config=config,
    )  # fmt: skip


def test_live_sessions_ask_for_replicas_that_few_requests_would_not():
    policy = SessionLoadPolicy(target_session_load=0.75)
    # two full replicas, 5 requests in flight between units: requests alone would scale down to 1
    assert policy(context(2, requests=5, loads=[1.0, 1.0]))[0] == 3
    assert policy(context(2, requests=5, loads=[0.75, 0.75]))[0] == 2, "exactly at the target: no scale-up"
    assert policy(context(2, requests=5, loads=[0.5, 0.25]))[0] == 1, "the sessions fit one replica at the target"


def test_requests_still_scale_beyond_what_the_sessions_need():
    policy = SessionLoadPolicy(target_session_load=0.75)
    assert policy(context(2, requests=60, loads=[0.1, 0.1]))[0] == pytest.approx(6.0)  # 60 / 10 per replica
    assert policy(context(2, requests=60, loads=None))[0] == pytest.approx(6.0), "no replica has reported yet"


def test_calls_sent_to_the_replicas_directly_count_as_requests():
    """Serve counts only what its handles sent; the live unit's calls go to the replicas directly."""
    policy = SessionLoadPolicy(target_session_load=0.75)
    assert policy(context(2, requests=20, loads=None, direct=[25.0, 15.0]))[0] == pytest.approx(6.0)  # 60 / 10
    assert policy(context(1, requests=0, loads=None, direct=[30.0]))[0] == pytest.approx(3.0), "a stateless stage"
    assert policy(context(2, requests=20, loads=None, direct=[0.0, 0.0]))[0] == pytest.approx(2.0)


def test_replicas_for_rounds_up_without_float_noise():
    assert replicas_for(1.5, 0.75) == 2
    assert replicas_for(1.51, 0.75) == 3
    assert replicas_for(0.0, 0.75) == 0


def test_a_target_outside_0_1_is_a_configuration_error():
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="target_session_load"):
            SessionLoadPolicy(target_session_load=bad)
