"""One real local Ray cluster + Ray Serve app + redis-server for the whole e2e test session
(`tests.stack.serve_stack`: the production application on the golden tiny checkpoint, on CPU, gRPC and
HTTP on free 127.0.0.1 ports); tests talk to it over real gRPC / HTTP only."""

from __future__ import annotations

import pytest

from services.client.sdk import MiniCPMOClient
from tests.stack import APP_NAME, CONTEXT_WINDOW, KEYS, ServedApp, serve_stack  # noqa: F401 (re-exported)


@pytest.fixture(scope="session")
def served(golden) -> ServedApp:
    with serve_stack(str(golden.checkpoint)) as app:
        yield app


@pytest.fixture
def client(served: ServedApp):
    with MiniCPMOClient(served.target, api_key=served.keys[0]) as c:
        yield c


@pytest.fixture
def other_client(served: ServedApp):
    with MiniCPMOClient(served.target, api_key=served.keys[1]) as c:
        yield c
