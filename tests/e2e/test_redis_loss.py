"""Redis down and back: while it is down, health turns NOT_SERVING, session calls fail UNAVAILABLE (retryable)
and offline chat keeps working; Redis runs with an append-only file (as `make run` and the k8s manifests run it),
so after its restart the same session continues with its whole context, without any replica restart."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.client.sdk import text, user
from tests.e2e.media import image_bytes, wav
from tests.e2e.test_sessions import feed_units, greedy

pytestmark = [pytest.mark.ray, pytest.mark.redis, pytest.mark.slow]


def conversation(client, golden, during=None) -> list[list[int]]:
    pcm = wav(golden, "unit_audio_2s.wav")
    frames = [image_bytes(golden, "image_unit0.png"), image_bytes(golden, "image_unit1.png")]
    sid = client.create_session().session_id
    feed_units(client, sid, pcm[:24000], frames)  # 1.5 s: one unit, half a second left in the gateway
    first = client.respond(sid, greedy(6)).token_ids
    client.append(sid, audio=pcm[:8000])
    if during is not None:
        during(sid)
    feed_units(client, sid, pcm[8000:], frames)
    second = client.respond(sid, greedy(8)).token_ids
    client.close_session(sid)
    return [first, second]


def test_redis_restart_keeps_sessions(served, client, golden):
    reference = conversation(client, golden)

    def restart(sid: str) -> None:
        served.redis.stop()
        try:
            assert client.health() == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                client.get_session(sid)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "Redis" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                client.create_session()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert client.chat([user(text("Offline chat needs no Redis."))], max_new_tokens=3, greedy=True).token_ids
        finally:
            served.redis.start()
        assert client.health() == health_pb2.HealthCheckResponse.SERVING

    assert conversation(client, golden, during=restart) == reference
