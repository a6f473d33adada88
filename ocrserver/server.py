"""Starting the local server: in a background thread, in the foreground, or as a subprocess.

For tests, the demo and benchmarks::

    from ocrserver.server import ServerConfig, start_server

    with start_server(ServerConfig(qps=10)) as server:      # port 0: a free port
        endpoint = server.url                               # "http://127.0.0.1:PORT"
        ...                                                 # stats: server.app.stats

    with spawn_server(["--qps", "10"]) as proc:             # `python -m ocrserver --port 0 ...`
        endpoint = proc.url

Both run uvicorn with httptools and uvloop. :func:`start_server` returns once the socket is
listening; ``stop()`` (or leaving the ``with``) shuts it down, cutting held (hanging) calls
after ``graceful_shutdown_s``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import uvicorn

from ocrserver.app import OcrApp, build_app
from ocrserver.config import ServerConfig
from ocrserver.recognizers.base import Recognizer
from workers.errors import ConfigError

__all__ = [
    "URL_LINE_PREFIX",
    "RunningServer",
    "ServerConfig",
    "ServerProcess",
    "bind_socket",
    "run_forever",
    "spawn_server",
    "start_server",
    "stop_process",
]

URL_LINE_PREFIX = "carnumber serve: listening on "


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket (IPv4 or IPv6 by the host's form); ``port=0`` picks a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Uvicorn(uvicorn.Server):
    """uvicorn.Server that calls ``on_started`` once it accepts connections."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._on_started is not None:
            self._on_started()


def _uvicorn_config(app: OcrApp, config: ServerConfig) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level=config.log_level,
        timeout_graceful_shutdown=config.graceful_shutdown_s,
        timeout_keep_alive=30,
        server_header=False,
        date_header=True,
    )


class RunningServer:
    """A server on a background thread. ``url`` is ``http://host:port``; ``app`` gives direct
    access to its state (``app.stats``). A context manager; ``stop()`` is idempotent."""

    def __init__(self, url: str, app: OcrApp, server: _Uvicorn, thread: threading.Thread) -> None:
        self.url = url
        self.app = app
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_server(
    config: ServerConfig | None = None,
    recognizer: Recognizer | None = None,
    timeout_s: float = 10.0,
) -> RunningServer:
    """Start a server in a daemon thread and return once it listens.

    Raises :class:`ConfigError` for a bad config or a port in use, ``RuntimeError`` when it does
    not come up within ``timeout_s``.
    """
    config = config or ServerConfig()
    app = build_app(config, recognizer)
    sock = bind_socket(config.host, config.port)
    url = _url(sock)
    started = threading.Event()
    server = _Uvicorn(_uvicorn_config(app, config), started.set)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # surfaced to the caller below
            errors.append(exc)
        finally:
            sock.close()
            started.set()

    thread = threading.Thread(target=run, name=f"carnumber-server-{url}", daemon=True)
    thread.start()
    if not started.wait(timeout_s) or errors or not server.started:
        server.should_exit = True
        thread.join(timeout_s)
        raise RuntimeError(f"local server did not start: {errors[0] if errors else 'timeout'}")
    return RunningServer(url, app, server, thread)


def run_forever(config: ServerConfig, print_url: Callable[[str], None] | None = None) -> None:
    """Serve in the foreground until SIGINT/SIGTERM; ``print_url`` is called once listening."""
    app = build_app(config)
    sock = bind_socket(config.host, config.port)
    url = _url(sock)
    server = _Uvicorn(_uvicorn_config(app, config), (lambda: print_url(url)) if print_url else None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def stop_process(
    proc: subprocess.Popen[str], drain: threading.Thread | None, timeout_s: float
) -> None:
    """Stop a child whose output ``drain`` reads: SIGTERM, SIGKILL after ``timeout_s``, then
    wait for the reader and close the pipe (only once nobody reads it)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if drain is not None:
        drain.join(5)
    if proc.stdout and (drain is None or not drain.is_alive()):
        proc.stdout.close()


class ServerProcess:
    """A server in a child process (``python -m ocrserver ...``). A context manager."""

    def __init__(self, proc: subprocess.Popen[str], url: str, output: list[str]) -> None:
        self.proc = proc
        self.url = url
        self.output = output  # the child's output lines (kept: the server logs little)
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()

    def _read_rest(self) -> None:
        # Keep draining the child's output so it never blocks on a full pipe.
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line.rstrip())

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_process(self.proc, self._drain, timeout_s)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def spawn_server(
    args: Sequence[str] = (),
    *,
    cpus: Sequence[int] | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 20.0,
) -> ServerProcess:
    """Run ``python -m ocrserver --port 0 *args`` (pinned to ``cpus`` with ``taskset`` when
    given) and return once it printed its URL line. ``args`` are ``carnumber serve`` flags.

    Raises ``RuntimeError`` with the child's output when it exits or stays silent.
    """
    cmd = [sys.executable, "-m", "ocrserver", "--port", "0", *args]
    if cpus:
        cmd = ["taskset", "-c", ",".join(str(c) for c in cpus), *cmd]
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    # The child must import this very checkout, wherever it is started from.
    root = str(Path(__file__).resolve().parents[1])
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, child_env.get("PYTHONPATH", "")) if p
    )
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env
    )
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    result: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line.rstrip())
            if line.startswith(URL_LINE_PREFIX):
                result.append(line[len(URL_LINE_PREFIX) :].strip())
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(max(0.0, deadline - time.monotonic()))
    if not result:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait(5)
        t.join(5)
        if proc.stdout and not t.is_alive():
            proc.stdout.close()
        raise RuntimeError("local server did not start:\n" + "\n".join(seen[-20:]))
    return ServerProcess(proc, result[0], seen)
