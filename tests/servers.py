"""Real servers for tests: a ``redis-server`` on 127.0.0.1 with a free port and its own temp dir.

Public API
----------
``RedisServer.start(tmp_dir=None, startup_timeout_s=10.0) -> RedisServer``: runs ``redis-server`` (no
persistence, no config file) bound to 127.0.0.1 on a free port; returns once it answers PING (polls the socket).
``.url`` (``redis://127.0.0.1:<port>/0``), ``.port``, ``.pid``, ``.stop()`` (SIGTERM by PID, then SIGKILL if it
lingers; removes the temp dir it made), ``.flushall()``; usable as a context manager.
``redis_server`` (pytest fixture, session-scoped): one server for the whole test session. Import it into a
conftest (``from tests.servers import redis_server  # noqa: F401``) or a test module.
``redis_url`` (pytest fixture, function-scoped): the session server's URL after ``FLUSHALL``, so each test starts
from an empty Redis.
``require_redis_server() -> str``: the binary's path, or a failing ``RuntimeError`` that says how to install it
(``make setup`` / ``apt-get install redis-server``); tests never silently skip for a missing server.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def require_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError("redis-server not found: run `make setup` (or `apt-get install -y redis-server`)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int, timeout_s: float = 0.5) -> bool:
    """One raw RESP PING; True on +PONG. (No redis-py here, so the helper checks the server, not the client.)"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, proc: subprocess.Popen, port: int, workdir: Path, owns_workdir: bool) -> None:
        self._proc = proc
        self.port = port
        self.workdir = workdir
        self._owns_workdir = owns_workdir

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, tmp_dir: str | os.PathLike | None = None, startup_timeout_s: float = 10.0) -> RedisServer:
        binary = require_redis_server()
        owns = tmp_dir is None
        workdir = Path(tempfile.mkdtemp(prefix="redis-test-")) if owns else Path(tmp_dir)
        workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        # Port picked then bound by the server: another process could take it in between; the PING loop below
        # then sees the server exit and the error names the port.
        args = [
            binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
            "--logfile", str(workdir / "redis.log"),
        ]  # fmt: skip
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        server = cls(proc, port, workdir, owns)
        deadline = time.monotonic() + startup_timeout_s
        delay = 0.005
        while not _ping(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (workdir / "redis.log").read_text(errors="replace")[-2000:] if (workdir / "redis.log").exists() else ""
                server.stop()
                raise RuntimeError(f"redis-server on port {port} did not answer PING (exit={proc.returncode}): {log}")
            time.sleep(delay)  # polling back-off, not a fixed wait
            delay = min(delay * 2, 0.1)
        return server

    def flushall(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as s:
            s.sendall(b"*1\r\n$8\r\nFLUSHALL\r\n")
            if not s.recv(64).startswith(b"+OK"):
                raise RuntimeError("FLUSHALL failed")

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=timeout_s)
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.flushall()
    return redis_server.url
