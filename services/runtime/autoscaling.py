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
        by_requests, state = replica_queue_length_autoscaling_policy(ctx)
        loads = (ctx.aggregated_metrics or {}).get(SESSION_LOAD, {})
        return max(by_requests, replicas_for(sum(loads.values()), self.target_session_load)), state
