"""A local `redis-server` process: what `minicpmo serve`, the benchmarks and the tests run (never a fake).

`persistent=True` turns on the append-only file (fsync every second) in the server's own directory, so a
restarted server (same directory, same port: `restart()`) comes back with every session it held; without it
the server keeps nothing across a restart.
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

import redis


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError("redis-server not found: run `make setup` (or `apt-get install -y redis-server`)")
    return path


class RedisServer:
    """One redis-server bound to 127.0.0.1; `url`, `port`, `pid`, `stop()`, `restart()`, `flushall()`."""

    def __init__(self, workdir: str | os.PathLike | None = None, port: int | None = None, persistent: bool = False):
        self._owns_workdir = workdir is None
        # redis-server changes into --dir before it opens its log file: the path must be absolute
        self.workdir = Path(tempfile.mkdtemp(prefix="redis-")) if workdir is None else Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.persistent = persistent
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    @property
    def log_file(self) -> Path:
        return self.workdir / "redis.log"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.persistent else ["--appendonly", "no"]
        args = [
            redis_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.workdir),
            "--save", "", *persistence, "--daemonize", "no", "--protected-mode", "yes",
            "--logfile", str(self.log_file),
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while True:
            try:
                if client.ping():
                    client.close()
                    return self
            except redis.RedisError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start (exit {self._proc.returncode}): {log}")
            time.sleep(delay)  # polling start-up with back-off
            delay = min(delay * 2, 0.1)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (a persistent server writes its append-only file first), SIGKILL if it lingers."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=timeout_s)

    def restart(self) -> None:
        """Stop and start again on the same port and directory (clients reconnect to the same URL)."""
        self.stop()
        self.start()

    def flushall(self) -> None:
        client = redis.Redis(port=self.port)
        try:
            client.flushall()
        finally:
            client.close()

    def close(self) -> None:
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
