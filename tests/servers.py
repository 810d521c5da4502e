"""Real servers for tests: one `redis-server` (services.app.redis_server) on 127.0.0.1 for the test session.

``redis_server`` (session-scoped fixture): the server; import it into a test module or conftest
(``from tests.servers import redis_server  # noqa: F401``). ``redis_url`` (function-scoped): its URL after
``FLUSHALL``, so each test starts from an empty Redis. A missing redis-server fails with how to install it
(tests never silently skip).
"""

from __future__ import annotations

import pytest

from services.app.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server():
    with RedisServer().start() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.flushall()
    return redis_server.url
