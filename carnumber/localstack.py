"""Start the pieces of a one-machine deployment as child processes: the local API server and
Celery workers. Used by ``carnumber demo`` and by the benchmarks; each child is stopped on exit."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from ocrserver.server import ServerProcess, spawn_server, stop_process
from workers.errors import ConfigError

__all__ = ["Child", "start_server", "start_worker", "stopping"]


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    pump: threading.Thread | None = None

    def stop(self, timeout_s: float = 15.0) -> None:
        stop_process(self.proc, self.pump, timeout_s)


def _pump(child: Child) -> None:
    assert child.proc.stdout is not None
    for raw in child.proc.stdout:
        line = raw.rstrip()
        child.lines.append(line)
        del child.lines[:-200]


def _spawn(name: str, argv: Sequence[str], env: Mapping[str, str] | None) -> Child:
    proc = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    child = Child(name, proc)
    child.pump = threading.Thread(target=_pump, args=(child,), daemon=True)
    child.pump.start()
    return child


def start_server(
    args: Sequence[str], env: Mapping[str, str] | None = None, timeout_s: float = 60.0
) -> ServerProcess:
    """``carnumber serve --port 0 ARGS...`` in a child process; returns once it listens.

    A thin wrapper over :func:`ocrserver.server.spawn_server` that reports a failed start as a
    :class:`ConfigError` (one line from the CLI, not a traceback).
    """
    try:
        return spawn_server(list(args), env={**os.environ, **(env or {})}, timeout_s=timeout_s)
    except RuntimeError as exc:
        raise ConfigError(f"local API server did not start: {exc}") from None


def start_worker(
    env: Mapping[str, str],
    concurrency: int | None = 2,
    hostname: str = "worker@%h",
    extra: Sequence[str] = (),
    via_cli: bool = False,
) -> Child:
    """A Celery worker child on the queue named in ``env`` (``CARNUMBER_QUEUE``), started as
    ``celery -A workers worker`` or, with ``via_cli``, as ``carnumber worker`` (``concurrency``
    None: no ``--concurrency`` flag, the command's default)."""
    queue = env.get("CARNUMBER_QUEUE", "carnumber")
    common = ["--loglevel=WARNING", f"--hostname={hostname}"]
    if concurrency is not None:  # None: the worker's own default
        common.append(f"--concurrency={concurrency}")
    if via_cli:
        argv = [sys.executable, "-m", "carnumber.cli", "worker", *common, *extra]
    else:
        celery = [sys.executable, "-m", "celery", "-A", "workers", "worker", f"--queues={queue}"]
        argv = [*celery, *common, "--without-mingle", "--without-gossip", *extra]
    return _spawn("worker", argv, env)


@contextlib.contextmanager
def stopping(*children: Child | ServerProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for child in reversed(children):
            child.stop()
