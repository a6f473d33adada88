"""The parts a fault drill runs: its own Redis (AOF on, stoppable), the local API server, worker
*nodes* (``carnumber worker`` in a process group of its own, so a SIGKILL takes the main
process and its whole pool, as a dead host or the OOM killer does), the producer as the real
command, and the audit of the output. Used by ``ops/drills/faults.py`` and ``tests/test_drills.py``.
Every wait is bounded; everything listens on loopback (or a drill's own network namespaces).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import redis

from carnumber.embedded_redis import redis_server_binary
from ocrserver.server import ServerProcess, spawn_server
from ocrserver.truth import write_test_archive
from workers.books.runs import RunStore, RunSummary
from workers.keys import Keys
from workers.sink.compact import compact_run
from workers.sink.dataset import open_dataset

__all__ = ["Audit", "Drill", "DrillRedis", "Node", "audit"]

ROOT = Path(__file__).resolve().parents[2]
KEY_ID, SECRET = "drillid", "drill-secret-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DrillRedis:
    """A redis-server of the drill's own, AOF on (``appendfsync everysec``), on a fixed port and
    data directory so that :meth:`stop` then :meth:`start` is a real restart."""

    def __init__(
        self, workdir: Path, host: str = "127.0.0.1", port: int | None = None, also_bind: Sequence[str] = ()
    ) -> None:
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.also_bind = list(also_bind)
        self.port = port or _free_port()
        self._port_chosen = port is None  # a port we picked may be taken by the time we bind it
        self._started_once = False
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 30.0) -> None:
        """Start it and wait until it answers. A port picked free that another process took
        meanwhile (drills side by side) is picked again, before the first start only: a restart
        must come back where the clients are."""
        for _ in range(5):
            if self._start_once(timeout_s):
                self._started_once = True
                return
            if not self._port_chosen or self._started_once:
                break
            self.port = _free_port()
        raise RuntimeError(f"redis-server on {self.url} did not start in {timeout_s} s")

    def _start_once(self, timeout_s: float) -> bool:
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--bind", self.host, *self.also_bind, "--port", str(self.port), "--dir", str(self.dir),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                "--maxmemory-policy", "noeviction", "--protected-mode", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(host=self.host, port=self.port, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(redis.RedisError):
                    # Ours, not another drill's server on the same port.
                    if int(client.info("server")["process_id"]) == self.proc.pid:
                        return True
                time.sleep(0.1)
        finally:
            client.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc = None
        return False

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (Redis writes its AOF out and exits) or, with ``kill``, SIGKILL (the last
        second of writes may be lost)."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@dataclass
class Node:
    """One worker node: ``carnumber worker`` as the leader of its own process group."""

    name: str
    proc: subprocess.Popen[str]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the node's main process and its pool at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the node's whole process group (main process and pool)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def freeze(self) -> None:
        """SIGSTOP the node (a paused VM, a process stopped for a debugger): nothing runs, its
        sockets stay open, its leases stop being renewed."""
        self.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    def stop(self) -> None:
        if not self.alive():
            return
        self.thaw()  # a frozen node would not see the SIGTERM
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""


@dataclass
class Drill:
    """One drill's world: its Redis, its server, its nodes, its run; :meth:`close` ends them."""

    work: Path
    images: int
    chunk_size: int = 100
    concurrency: int = 16
    processes: int = 2  # `carnumber worker -c`: chunks at once (threads) or processes (prefork)
    pool: str = "threads"  # the worker's default pool
    lease_s: float = 20.0
    latency_ms: int = 30
    server_args: Sequence[str] = ()
    redis_host: str = "127.0.0.1"
    also_bind: Sequence[str] = ()  # more addresses for Redis and the server (test hosts' links)
    extra_env: dict[str, str] = field(default_factory=dict)
    prefix: str = field(default_factory=lambda: f"drill-{uuid.uuid4().hex[:8]}")
    nodes: list[Node] = field(default_factory=list)
    run_id: str = "drill"
    log_level: str = "WARNING"  # the nodes' (INFO shows when a node is ready)

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.redis = DrillRedis(self.work, host=self.redis_host, also_bind=self.also_bind)
        self.redis.start()
        # Test hosts in network namespaces reach the server over their own links.
        host = "0.0.0.0" if self.also_bind else "127.0.0.1"
        self.server: ServerProcess = spawn_server(
            ["--host", host, "--latency-ms", str(self.latency_ms), *self.server_args],
            env={**os.environ, "CARNUMBER_SERVER_KEYS": f"{KEY_ID}:{SECRET}"},
        )
        self.archive = self.work / "archive"
        if not self.archive.exists():
            write_test_archive(self.archive, self.images)
        self.client = redis.Redis.from_url(self.redis.url, socket_timeout=5, socket_connect_timeout=2)

    # -- environment -------------------------------------------------------------------------
    def env(self, endpoint: str | None = None, redis_url: str | None = None) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "REDIS_URL": redis_url or self.redis.url,
            "CARNUMBER_ENDPOINT": endpoint or str(self.server.url),
            "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET,
            "CARNUMBER_OUTPUT": str(self.work / "out"),
            "CARNUMBER_QUEUE": f"{self.prefix}-queue",
            "CARNUMBER_KEY_PREFIX": self.prefix,
            "CARNUMBER_QPS": "0",
            "CARNUMBER_CHUNK_SIZE": str(self.chunk_size),
            "CARNUMBER_CONCURRENCY": str(self.concurrency),
            "CARNUMBER_LEASE_S": str(self.lease_s),
            "CARNUMBER_QUEUE_HIGH_WATER": "20",
            **self.extra_env,
        }

    @property
    def runs(self) -> RunStore:
        return RunStore(self.client, Keys(self.prefix))

    # -- processes ---------------------------------------------------------------------------
    def start_node(self, prefix_cmd: Sequence[str] = (), env: dict[str, str] | None = None) -> Node:
        name = f"node{len(self.nodes) + 1}"
        log = self.work / f"{name}.log"
        argv = [
            *prefix_cmd, sys.executable, "-m", "carnumber.cli", "worker",
            "-c", str(self.processes), "--pool", self.pool, "-n", f"{name}-{uuid.uuid4().hex[:4]}@%h",
            "-l", self.log_level,
        ]  # fmt: skip
        with log.open("w") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, text=True, env={**self.env(), **(env or {})},
                start_new_session=True,
            )  # fmt: skip
        node = Node(name, proc, log)
        self.nodes.append(node)
        return node

    def enqueue_cmd(self) -> list[str]:
        return [sys.executable, "-m", "carnumber.cli", "enqueue", str(self.archive), "--run", self.run_id]

    def start_producer(self) -> subprocess.Popen[bytes]:
        """``carnumber enqueue`` in the background, its output in ``producer.log``."""
        with (self.work / "producer.log").open("ab") as out:
            return subprocess.Popen(self.enqueue_cmd(), env=self.env(), stdout=out, stderr=subprocess.STDOUT)

    def producer_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.work / "producer.log").read_text(errors="replace")[-2000:]
        return ""

    def enqueue(self, timeout_s: float = 600.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.enqueue_cmd(), env=self.env(), capture_output=True, text=True, timeout=timeout_s, check=False
        )

    def server_stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.server.url}/__carnumber/stats", timeout=10).json())

    def server_calls(self) -> int:
        """Calls the server accepted (signed, valid, not throttled): what would be billed."""
        return int(self.server_stats().get("accepted_total", 0))

    def server_pictures(self) -> dict[str, list[float]]:
        """Per picture (SHA-256 of its bytes), when each accepted call for it was let through."""
        return dict(httpx.get(f"{self.server.url}/__carnumber/pictures", timeout=30).json())

    # -- waiting -----------------------------------------------------------------------------
    def summary(self) -> RunSummary | None:
        with contextlib.suppress(redis.RedisError):
            return self.runs.get(self.run_id)
        return None

    def wait_for(self, what: str, done: Callable[[RunSummary], bool], timeout_s: float) -> float:
        """Seconds until ``done(summary)``; RuntimeError after ``timeout_s`` (with node logs)."""
        started = time.monotonic()
        last_print = started
        while True:
            s = self.summary()
            if s is not None and done(s):
                return time.monotonic() - started
            now = time.monotonic()
            if now - started > timeout_s:
                logs = "\n".join(f"--- {n.name}\n{n.tail()}" for n in self.nodes)
                raise RuntimeError(f"{what}: not reached in {timeout_s:.0f} s ({s})\n{logs}")
            if now - last_print > 15 and s is not None:
                print(f"    {what}: {s.written}/{s.enqueued} written, {s.parked} parked, state {s.state}",
                      flush=True)  # fmt: skip
                last_print = now
            time.sleep(0.25)

    def finished(self, s: RunSummary) -> bool:
        return s.state == "done" and s.outstanding == 0 and s.parked == 0

    def held_since(self, t_epoch: float) -> set[str]:
        """Delivery tags whose lease was last renewed before ``t_epoch`` (by Redis's clock)."""
        return {t.decode() for t in self.client.zrangebyscore("unacked_index", "-inf", t_epoch)}

    def redis_time(self) -> float:
        s, us = self.client.time()
        return s + us / 1e6

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        self.server.stop()
        self.client.close()
        self.redis.stop()


@dataclass(frozen=True, slots=True)
class Audit:
    archive: int
    in_output: int
    missing: int
    duplicated: int
    rows_duplicated_before_compaction: int
    calls: int

    @property
    def extra_calls(self) -> int:
        return self.calls - self.in_output

    def ok(self, max_extra_calls: int) -> bool:
        return self.missing == 0 and self.duplicated == 0 and 0 <= self.extra_calls <= max_extra_calls


def _duplicate_rows(table: pa.Table) -> int:
    if table.num_rows == 0:
        return 0
    keyed = pa.table({"i": table["image_id"], "p": pc.fill_null(table["plate_index"], -1)})
    return table.num_rows - keyed.group_by(["i", "p"]).aggregate([]).num_rows


def audit(drill: Drill) -> Audit:
    """Compact the run, then compare it with the archive: every image exactly once."""
    from producers.sources import open_source
    from workers.config import Settings

    settings = Settings.from_env(
        {k: v for k, v in drill.env().items() if k.startswith(("CARNUMBER_", "ALIB"))}
    )
    expected = {r.image_id for r in open_source(str(drill.archive), settings)}
    dataset = open_dataset(str(drill.work / "out"))
    before = dataset.read_run(drill.run_id, columns=["image_id", "plate_index"])
    compact_run(dataset, drill.run_id)
    after = dataset.read_run(drill.run_id, columns=["image_id", "plate_index"])
    got = set(after["image_id"].to_pylist())
    return Audit(
        archive=len(expected),
        in_output=len(got & expected),
        missing=len(expected - got),
        duplicated=_duplicate_rows(after),
        rows_duplicated_before_compaction=_duplicate_rows(before),
        calls=drill.server_calls(),
    )


def drill_dir(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"carnumber-drill-{name}-"))


def background(fn: Callable[[], Any]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t
