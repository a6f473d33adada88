"""Start the pieces of a one-machine deployment as child processes: the local API server and
Celery workers. Used by ``carnumber demo`` and by the benchmarks; each child is stopped on exit."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from workers.errors import ConfigError

__all__ = ["Child", "start_server", "start_worker", "stopping"]

_URL = re.compile(r"https?://[0-9A-Za-z.\[\]:-]+")


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[str]
    url: str | None = None
    lines: list[str] = field(default_factory=list)
    pump: threading.Thread | None = None

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.pump is not None:
            self.pump.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _pump(child: Child, url_seen: threading.Event) -> None:
    assert child.proc.stdout is not None
    for raw in child.proc.stdout:
        line = raw.rstrip()
        child.lines.append(line)
        del child.lines[:-200]
        if child.url is None and (m := _URL.search(line)):
            child.url = m.group(0).rstrip("/")
            url_seen.set()


def _spawn(
    name: str, argv: Sequence[str], env: Mapping[str, str] | None
) -> tuple[Child, threading.Event]:
    proc = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    child = Child(name, proc)
    seen = threading.Event()
    child.pump = threading.Thread(target=_pump, args=(child, seen), daemon=True)
    child.pump.start()
    return child, seen


def start_server(
    args: Sequence[str], env: Mapping[str, str] | None = None, timeout_s: float = 60.0
) -> Child:
    """``carnumber serve --port 0 ARGS...``; returns once it printed the URL it listens on."""
    argv = [
        sys.executable,
        "-m",
        "carnumber.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *args,
    ]
    child, seen = _spawn("server", argv, env)
    deadline = time.monotonic() + timeout_s
    while not seen.wait(0.1):
        if child.proc.poll() is not None or time.monotonic() > deadline:
            child.stop()
            tail = "\n".join(child.lines[-20:])
            raise ConfigError(f"local API server did not start:\n{tail}")
    return child


def start_worker(
    env: Mapping[str, str],
    concurrency: int = 2,
    hostname: str = "worker@%h",
    extra: Sequence[str] = (),
    via_cli: bool = False,
) -> Child:
    """A Celery worker child on the queue named in ``env`` (``CARNUMBER_QUEUE``), started as
    ``celery -A workers worker`` or, with ``via_cli``, as ``carnumber worker``."""
    queue = env.get("CARNUMBER_QUEUE", "carnumber")
    common = ["--loglevel=WARNING", f"--concurrency={concurrency}", f"--hostname={hostname}"]
    if via_cli:
        argv = [sys.executable, "-m", "carnumber.cli", "worker", *common, *extra]
    else:
        celery = [sys.executable, "-m", "celery", "-A", "workers", "worker", f"--queues={queue}"]
        argv = [*celery, *common, "--without-mingle", "--without-gossip", *extra]
    child, _ = _spawn("worker", argv, env)
    return child


@contextlib.contextmanager
def stopping(*children: Child) -> Iterator[None]:
    try:
        yield
    finally:
        for child in reversed(children):
            child.stop()
