"""The environment every Ray process of the app runs with: local clusters (`minicpmo serve`, the benchmarks, the
test stack) set it before `ray.init`, whose processes inherit it; the k8s manifests set the same on every Ray pod.

`RAY_SERVE_USE_GRPC_BY_DEFAULT=1`: calls between deployments, and the gRPC proxy's calls to the gateway, go from
replica to replica over gRPC (arguments by value) instead of as Ray actor tasks through the object store. It is
one of the settings of Serve's own `RAY_SERVE_THROUGHPUT_OPTIMIZED` mode; we take only it, because the others
(user code on the replica's main loop, the router on the caller's loop, buffered request logs) measured no
difference here. Measured on the 2-core CPU box: a no-op call between two deployments 3.3-4.2 -> 2.3-2.9 ms; a
tiny live unit through the deployments (p50, 5 interleaved pairs) 73/75, 95/70, 87/67, 87/71, 86/70 ms; an
audio-only unit 34/29, 40/28, 37/31 ms. What changes for the app:
- an encoder response passed to an LLMCore call travels through the gateway by value. By reference, Serve also
  waited in the gateway until it was ready before sending the LLMCore call, so no call goes out later than before;
- a call on a replica that dies fails with `ActorUnavailableError` (Serve maps the lost gRPC call to it): the
  stage calls' retry (`services.gateway.stages`) takes it as it takes `ActorDiedError`, and the proxy reports a
  gateway that died under a call as INTERNAL "... Actor is unavailable ...", which the SDK's `retryable` knows.
"""

from __future__ import annotations

import os

SERVE_ENV = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}


def use_local_cluster_env() -> None:
    """Before `ray.init` of a local cluster: no auth (one user, loopback only) and `SERVE_ENV`, unless the caller's
    environment already says otherwise."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
