"""Replicas call each other with their own process's Serve transport, not the one baked into the handles they were
given: the process that built the app may have imported Ray Serve before `RAY_SERVE_USE_GRPC_BY_DEFAULT` was set
(the pipeline benchmark did, after its in-process run), and its handles then sent every stage call by reference
through the object store (unit p50 86-89 ms deployed against 54 ms by value, same box and run)."""

from __future__ import annotations

import pytest
import ray.serve._private.constants as serve_constants
from ray import serve

from services.runtime.replica import with_own_transport
from tests.stack import APP_NAME

pytestmark = [pytest.mark.ray]


@pytest.mark.parametrize("grpc_by_default", [True, False])
def test_a_handle_takes_the_transport_of_the_process_that_calls(served, monkeypatch, grpc_by_default):
    given = serve.get_deployment_handle("LLMCore", APP_NAME).options(_by_reference=grpc_by_default)  # the other one
    monkeypatch.setattr(serve_constants, "RAY_SERVE_USE_GRPC_BY_DEFAULT", grpc_by_default)
    own = with_own_transport(given)
    assert own.handle_options._by_reference is not grpc_by_default
    assert own.options(session_id="s").handle_options._by_reference is not grpc_by_default, "kept by later options"
