"""Redis loss: health turns NOT_SERVING, session calls fail UNAVAILABLE (retryable), offline chat keeps working;
when Redis is back the pipeline serves sessions again without any restart."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.client.sdk import text, user
from tests.e2e.test_sessions import greedy
from tests.servers import RedisServer, require_redis_server

pytestmark = [pytest.mark.ray, pytest.mark.redis, pytest.mark.slow]


def restart_redis(old: RedisServer) -> RedisServer:
    """A new redis-server on the same port (the app's configured URL), empty (no persistence, as deployed)."""
    workdir = Path(tempfile.mkdtemp(prefix="redis-test-"))  # the old server removed its own
    args = [require_redis_server(), "--bind", "127.0.0.1", "--port", str(old.port), "--dir", str(workdir),
            "--save", "", "--appendonly", "no", "--logfile", str(workdir / "redis.log")]  # fmt: skip
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    new = RedisServer(proc, old.port, workdir, owns_workdir=True)
    import redis

    client = redis.Redis(port=old.port, socket_connect_timeout=1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if client.ping():
                return new
        except redis.ConnectionError:
            time.sleep(0.01)  # polling the server's start-up
    raise RuntimeError("redis-server did not come back")


def test_redis_loss_and_recovery(served, client):
    sid = client.create_session().session_id
    old = served.redis
    old.stop()
    try:
        assert client.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            client.get_session(sid)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as err:
            client.create_session()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert client.chat([user(text("Offline chat needs no Redis."))], max_new_tokens=3, greedy=True).token_ids
    finally:
        served.redis = restart_redis(old)
    assert client.health() == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:  # the restarted Redis is empty: the old session is gone
        client.get_session(sid)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    fresh = client.create_session().session_id
    client.append(fresh, text="hello again")
    assert client.respond(fresh, greedy(2)).token_ids
    client.close_session(fresh)
