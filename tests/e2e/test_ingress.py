"""Client calls reach the Gateway through HAProxy (`services.app.serve_env`): on the served stack, a probe app of two
replicas shows that HAProxy spreads session ids over the replicas and keeps every call of one session id on one
replica, as the Gateway's in-memory live input wants."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve

from protos.minicpmo.v1 import omni_pb2, omni_pb2_grpc
from services.app.serve_env import haproxy_ingress
from tests.stack import ServedApp

PROBE_APP = "ingress-probe"


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.05})
class ReplicaTag:
    """Answers GetSession with the id of the replica that served it."""

    def __init__(self):
        self.tag = serve.get_replica_context().replica_id.unique_id

    async def GetSession(self, request: omni_pb2.GetSessionRequest) -> omni_pb2.SessionInfo:
        return omni_pb2.SessionInfo(session_id=self.tag)


def until_served(call, timeout_s: float = 60.0):
    """`call()` once HAProxy has loaded the apps it needs (it reloads its routes after each deploy)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except grpc.RpcError as e:
            if time.monotonic() > deadline or e.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                raise


def test_haproxy_keeps_a_session_on_one_gateway_replica(served: ServedApp):
    assert haproxy_ingress(), "the stack serves through HAProxy"
    channel = grpc.insecure_channel(served.target)
    stub = omni_pb2_grpc.MiniCPMOStub(channel)

    def tag(session_id: str) -> str:
        md = [("application", PROBE_APP), ("session_id", session_id)]
        return stub.GetSession(omni_pb2.GetSessionRequest(session_id=session_id), metadata=md, timeout=10).session_id

    serve.run(ReplicaTag.bind(), name=PROBE_APP, route_prefix=f"/{PROBE_APP}")
    try:
        until_served(lambda: tag("warm-up"))
        keys = [f"session-{i:02d}" for i in range(24)]
        deadline = time.monotonic() + 60
        # HAProxy adds a replica once its health check passes, which may be after the app is running: the ids
        # spread over both replicas (the hash uses every server it has) before stickiness is measured
        while len({tag(key) for key in keys}) != 2:
            assert time.monotonic() < deadline, "HAProxy never sent any of 24 session ids to the second replica"
        served_by = {key: {tag(key) for _ in range(4)} for key in keys}
    finally:
        serve.delete(PROBE_APP)
        # the app's own calls carry no `application` header: they resolve again once HAProxy has one app
        health = health_pb2_grpc.HealthStub(channel)
        until_served(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10))
        channel.close()
    split = {key: tags for key, tags in served_by.items() if len(tags) != 1}
    assert not split, f"sessions split over replicas: {split}"
