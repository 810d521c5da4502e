"""LLMCore scales on the live sessions it holds, a new session finds the replica with room, and one API key holds
at most its quota of them: the production app (a second application on the e2e cluster) with an LLMCore that
admits two sessions per replica, autoscaled from one to two replicas by
`services.runtime.autoscaling.SessionLoadPolicy`, and a quota of three live sessions per key."""

from __future__ import annotations

import time

import grpc
import pytest
from ray import serve

from services.app.builder import build_app
from services.client.sdk import MiniCPMOClient
from services.llm_core.admission import AdmissionPolicy
from services.llm_core.context_window import WindowPolicy
from tests.e2e.media import wav
from tests.replicas import running
from tests.stack import CONTEXT_WINDOW, MAX_SESSION_TOKENS

pytestmark = [pytest.mark.ray, pytest.mark.redis, pytest.mark.slow]

SCALING = "minicpmo-session-scaling"
PER_REPLICA = 2
SMALL = {"num_cpus": 0.05}  # beside the main stack on the test cluster's 4 logical CPUs


def scaling_app(served):
    budget = AdmissionPolicy.kv_budget_for(PER_REPLICA, MAX_SESSION_TOKENS, WindowPolicy(*CONTEXT_WINDOW))
    llm_autoscaling = {
        "min_replicas": 1, "initial_replicas": 1, "max_replicas": 2,
        "target_ongoing_requests": 1000,  # requests alone never scale it: only the sessions do
        "upscale_delay_s": 0, "downscale_delay_s": 600, "metrics_interval_s": 0.5, "look_back_period_s": 2,
        "policy": {"policy_function": "services.runtime.autoscaling:SessionLoadPolicy",
                   "policy_kwargs": {"target_session_load": 0.75}},
    }  # fmt: skip
    deployments = {name: {"ray_actor_options": SMALL} for name in ("Gateway", "VisionEncoder", "AudioEncoder",
                                                                    "TTSDecoder")}  # fmt: skip
    deployments["LLMCore"] = {"ray_actor_options": SMALL, "autoscaling_config": llm_autoscaling,
                              "init_kwargs": {"kv_budget_tokens": budget}}  # fmt: skip
    return build_app({
        "model_dir": served.model_dir, "redis_url": served.redis_url, "api_keys": ",".join(served.keys),
        "device": "cpu", "deployments": deployments,
        "limits": {"max_session_tokens": MAX_SESSION_TOKENS, "context_window_tokens": CONTEXT_WINDOW[0],
                   "context_keep_tokens": CONTEXT_WINDOW[1],
                   "session_placement_attempts": 24,  # a full replica is drawn with p = 1/2: ~6e-8 to miss
                   "max_live_sessions_per_key": PER_REPLICA + 1},
    })  # fmt: skip


def wait_for(what: str, ready, timeout_s: float = 90.0):
    """Poll `ready()` (cluster state: the autoscaler's decisions and the routers' view of the replicas) until it
    returns something true."""
    deadline = time.monotonic() + timeout_s
    while not (result := ready()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return result


def admitted(client) -> str | None:
    try:
        return client.create_session().session_id
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
        return None


def routed_without_application(served) -> bool:
    """Whether Serve's ingress routes a call without `application` metadata: it does while it serves one app."""
    with MiniCPMOClient(served.target, api_key=served.keys[0]) as client:
        try:
            client.close_session(client.create_session().session_id)
            return True
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND and "Application metadata not set" in e.details(), e
            return False


def test_live_sessions_scale_llmcore_up_and_new_sessions_land_on_the_replica_with_room(served, golden):
    serve.run(scaling_app(served), name=SCALING, route_prefix="/session-scaling")
    opened: dict[str, MiniCPMOClient] = {}
    try:
        with (MiniCPMOClient(served.target, api_key=served.keys[0], application=SCALING) as alice,
              MiniCPMOClient(served.target, api_key=served.keys[1], application=SCALING) as bob):  # fmt: skip
            # one replica, two sessions: full. Few requests run, but the session load asks for a second replica
            for _ in range(PER_REPLICA):
                opened[alice.create_session().session_id] = alice
            with pytest.raises(grpc.RpcError) as full:
                alice.create_session()
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "no replica had room" in full.value.details() and "KV arena full" in full.value.details()
            wait_for("a second LLMCore replica for the sessions", lambda: running("LLMCore", SCALING) == 2)

            # the first replica stays full; new sessions drawn to it are placed again until they land on the new one
            # (retried here only while the gateway's router has not yet seen the new replica)
            opened[wait_for("a session on the new replica", lambda: admitted(alice), timeout_s=30)] = alice
            with pytest.raises(grpc.RpcError) as quota:  # the new replica has room, but not alice's quota
                alice.create_session()
            assert quota.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "holds 3 live sessions, its quota" in quota.value.details()
            opened[bob.create_session().session_id] = bob  # another key's quota is its own
            with pytest.raises(grpc.RpcError) as all_full:
                bob.create_session()
            assert all_full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "24 placements tried" in all_full.value.details()
            assert running("LLMCore", SCALING) == 2, "max_replicas bounds the policy"

            pcm = wav(golden, "unit_audio_2s.wav")
            for sid in list(opened)[PER_REPLICA:]:  # the new replica's sessions are served where they were admitted
                assert opened[sid].append(sid, audio=pcm[:16000]).units_prefilled == 1
            first = next(iter(opened))
            alice.close_session(first)  # frees a place in alice's quota and on the first replica
            del opened[first]
            opened[wait_for("room after a close", lambda: admitted(alice), timeout_s=30)] = alice
            for sid, client in opened.items():
                client.close_session(sid)
    finally:
        serve.delete(SCALING)  # back to one app: clients without `application` metadata reach it again, once
        # the ingress has its new routes (the tests after this one use such clients)
        wait_for("calls without application metadata to be routed", lambda: routed_without_application(served))
