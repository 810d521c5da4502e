"""The autoscaling policy of the stages that hold live sessions (LLMCore, AudioEncoder): replicas for the requests
in flight AND for the sessions held.

Ray Serve's default policy counts ongoing requests. A live session is not a request: between its units (one a
second) it holds state (KV room, a Whisper stream) and nothing runs, so 97 sessions, a full LLMCore replica, may
make ten requests in flight. On requests alone such a stage would never scale up for sessions (the next one is
refused while `max_replicas` is far off), and could scale down under sessions that then have nowhere to go.

So each replica reports its session load (`SESSION_LOAD`: the share of the sessions it admits that it holds;
LLMCore: promised KV over its live-session room, `AdmissionPolicy.session_load`; AudioEncoder: streams over
`max_live_streams`) through Serve's custom autoscaling metrics (`record_autoscaling_stats`), and this policy asks
for at least the replicas that hold all of that load at `target_session_load`:

    replicas = max(request-based replicas, ceil(sum of the replicas' loads / target_session_load))

Serve applies the deployment's bounds, scaling factors and delays to the result as to its own policy's. The
target leaves room for the sessions that arrive while a new replica starts (loading weights takes minutes on a
GPU): with 0.75, a scale-up begins once the replicas are three quarters full on average. A new session that finds
its replica full is placed again under another id (`services.gateway.live`), so it lands on a replica with room.

Serve counts the requests its handles send; the live unit's calls go to the replicas directly
(`services.runtime.direct`), so the replicas also report those in flight (`DIRECT_ONGOING`) and the request-based
part counts them too. A stateless stage (VisionEncoder) uses this policy for that alone: it reports no session load.

Serve config::

    autoscaling_config:
      ...
      policy:
        policy_function: services.runtime.autoscaling:SessionLoadPolicy
        policy_kwargs: {target_session_load: 0.75}
"""

from __future__ import annotations

import math
from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

from services.runtime.direct import DIRECT_ONGOING

SESSION_LOAD = "session_load"


def replicas_for(total_load: float, target_session_load: float) -> int:
    """Replicas that hold `total_load` (in replicas' worth of sessions) at `target_session_load` each."""
    return math.ceil(round(total_load / target_session_load, 6))  # round: 1.5 / 0.75 must not become 3


class SessionLoadPolicy:
    def __init__(self, target_session_load: float = 0.75) -> None:
        if not 0 < target_session_load <= 1:
            raise ValueError(f"target_session_load must be in (0, 1], got {target_session_load}")
        self.target_session_load = float(target_session_load)

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        by_requests, state = replica_queue_length_autoscaling_policy(with_direct_calls(ctx))
        loads = (ctx.aggregated_metrics or {}).get(SESSION_LOAD, {})
        return max(by_requests, replicas_for(sum(loads.values()), self.target_session_load)), state


def with_direct_calls(ctx: AutoscalingContext) -> AutoscalingContext:
    """`ctx` with the direct calls its replicas reported in flight added to its ongoing requests."""
    direct = sum(((ctx.aggregated_metrics or {}).get(DIRECT_ONGOING) or {}).values())
    if not direct:
        return ctx
    return AutoscalingContext(
        deployment_id=ctx.deployment_id, deployment_name=ctx.deployment_name, app_name=ctx.app_name,
        current_num_replicas=ctx.current_num_replicas, target_num_replicas=ctx.target_num_replicas,
        running_replicas=ctx.running_replicas, total_num_requests=ctx.total_num_requests + direct,
        total_queued_requests=ctx.total_queued_requests, aggregated_metrics=ctx.aggregated_metrics,
        raw_metrics=lambda: ctx.raw_metrics, capacity_adjusted_min_replicas=ctx.capacity_adjusted_min_replicas,
        capacity_adjusted_max_replicas=ctx.capacity_adjusted_max_replicas, policy_state=ctx.policy_state,
        last_scale_up_time=ctx.last_scale_up_time, last_scale_down_time=ctx.last_scale_down_time,
        current_time=ctx.current_time, config=ctx.config,
    )  # fmt: skip
