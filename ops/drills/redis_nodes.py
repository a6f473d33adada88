"""Real Redis processes on loopback for drills and tests: a TLS Redis with an ACL file, and a
Sentinel deployment (one master, replicas, Sentinels started with ``redis-server --sentinel``).

Each process has its own directory, port and log; :meth:`RedisProcess.kill` is a SIGKILL (a
dead host: the last second of writes may be lost), :meth:`RedisProcess.stop` a SIGTERM. Every
wait is bounded. Used by ``ops/drills/failover.py``, ``tests/test_redis_tls.py`` and
``tests/test_sentinel.py``.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from carnumber.embedded_redis import redis_server_binary

__all__ = ["RedisProcess", "SentinelDeployment", "free_port", "tls_redis"]

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class RedisProcess:
    """One ``redis-server`` (or Sentinel) on loopback; ``client_kwargs`` reach it for pings."""

    workdir: Path
    name: str
    args: Sequence[str]
    port: int = field(default_factory=free_port)
    client_kwargs: dict = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def dir(self) -> Path:
        return self.workdir / self.name

    def start(self, timeout_s: float = 30.0) -> RedisProcess:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = (self.dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [redis_server_binary(), *self.args], cwd=self.dir, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(host=HOST, port=self.port, socket_connect_timeout=0.5, **self.client_kwargs)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    client.ping()
                    return self
                except (redis.AuthenticationError, redis.ResponseError):
                    return self  # it answers (an ACL file may forbid the ping)
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(0.05)
        finally:
            client.close()
        tail = self.log_tail()
        self.kill()
        raise RuntimeError(f"{self.name} on port {self.port} did not start:\n{tail}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def log_tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.dir / "redis.log").read_text(errors="replace").splitlines()[-n:])
        return ""


def tls_redis(
    workdir: Path, certs_dir: Path, aclfile: Path | None = None, client_certs: str = "no"
) -> RedisProcess:
    """A Redis that speaks only TLS (its plaintext port off), with the certificates that
    ``ops/redis_tls.py certs`` wrote to ``certs_dir`` and, if given, an ACL file. ``client_certs``:
    ``tls-auth-clients`` (no, optional, yes). Not started: call :meth:`RedisProcess.start`."""
    c = Path(certs_dir)
    port = free_port()
    args = [
        "--port", "0", "--tls-port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
        "--tls-cert-file", str(c / "server.pem"), "--tls-key-file", str(c / "server.key"),
        "--tls-ca-cert-file", str(c / "ca.pem"), "--tls-auth-clients", client_certs,
    ]  # fmt: skip
    if aclfile is not None:
        args += ["--aclfile", str(aclfile)]
    ping = {
        "ssl": True, "ssl_ca_certs": str(c / "ca.pem"), "ssl_certfile": str(c / "client.pem"),
        "ssl_keyfile": str(c / "client.key"),
    }  # fmt: skip
    return RedisProcess(workdir, "redis-tls", args, port=port, client_kwargs=ping)


@dataclass
class SentinelDeployment:
    """One master, ``replicas`` replicas and ``sentinels`` Sentinels on loopback, monitoring the
    master as ``master_name`` with a quorum of 2. ``down_after_ms``: how long a silent master
    stays up in the Sentinels' eyes (the failover starts after it). ``password``: the servers'
    (``requirepass``; replicas and Sentinels use it too); ``sentinel_password``: the Sentinels'."""

    workdir: Path
    master_name: str = "mymaster"
    replicas: int = 2
    sentinels: int = 3
    down_after_ms: int = 2000
    failover_timeout_ms: int = 10000
    appendonly: bool = True
    password: str | None = None
    sentinel_password: str | None = None
    nodes: list[RedisProcess] = field(default_factory=list)
    sentinel_nodes: list[RedisProcess] = field(default_factory=list)

    def start(self) -> SentinelDeployment:
        aof = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.appendonly else []
        base = ["--bind", HOST, "--save", "", *aof, "--maxmemory-policy", "noeviction"]
        if self.password:  # every server may become the master, or a replica of another
            # Replicas log in as a user of their own, so that hold_replication() can refuse them.
            base += ["--requirepass", self.password, "--masteruser", "replicator", "--masterauth",
                     self.password, "--user", "replicator", "on", f">{self.password}", "+psync",
                     "+replconf", "+ping"]  # fmt: skip
        auth = {"password": self.password} if self.password else {}
        master = RedisProcess(self.workdir, "node0", [], client_kwargs=auth)
        master.args = ["--port", str(master.port), *base]
        self.nodes = [master.start()]
        for i in range(1, self.replicas + 1):
            node = RedisProcess(self.workdir, f"node{i}", [], client_kwargs=auth)
            node.args = ["--port", str(node.port), *base, "--replicaof", HOST, str(master.port)]
            self.nodes.append(node.start())
        for i in range(self.sentinels):
            sentinel = RedisProcess(self.workdir, f"sentinel{i}", [], client_kwargs=self._sentinel_auth())
            conf = sentinel.dir / "sentinel.conf"
            conf.parent.mkdir(parents=True, exist_ok=True)
            lines = [
                f"port {sentinel.port}", f"bind {HOST}", f"dir {sentinel.dir}",
                f"sentinel monitor {self.master_name} {HOST} {master.port} 2",
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {self.master_name} 1",
            ]  # fmt: skip
            if self.password:
                lines.append(f"sentinel auth-pass {self.master_name} {self.password}")
            if self.sentinel_password:  # clients and the other Sentinels log in with it
                pw = self.sentinel_password
                lines += [f"requirepass {pw}", f"sentinel sentinel-pass {pw}"]
            conf.write_text("\n".join(lines) + "\n")
            sentinel.args = [str(conf), "--sentinel"]
            self.sentinel_nodes.append(sentinel.start())
        self.wait_ready()
        return self

    def _sentinel_auth(self) -> dict:
        return {"password": self.sentinel_password} if self.sentinel_password else {}

    @property
    def url(self) -> str:
        """``REDIS_URL`` for this deployment, database 0 (Celery's form, the servers' password on
        the first entry); the Sentinels' password goes to ``CARNUMBER_SENTINEL_PASSWORD``."""
        auth = f":{self.password}@" if self.password else ""
        ports = [s.port for s in self.sentinel_nodes]
        entries = [f"sentinel://{auth if i == 0 else ''}{HOST}:{port}" for i, port in enumerate(ports)]
        return ";".join(entries) + "/0"

    def sentinel_client(self) -> redis.Redis:
        alive = next(s for s in self.sentinel_nodes if s.alive())
        return redis.Redis(host=HOST, port=alive.port, socket_timeout=2, socket_connect_timeout=1,
                           **self._sentinel_auth())  # fmt: skip

    def node_client(self, node: RedisProcess) -> redis.Redis:
        auth = {"password": self.password} if self.password else {}
        return redis.Redis(host=HOST, port=node.port, socket_timeout=2, socket_connect_timeout=1, **auth)

    def master_port(self) -> int:
        """The master's port as the Sentinels say now."""
        with contextlib.closing(self.sentinel_client()) as s:
            _, port = s.sentinel_get_master_addr_by_name(self.master_name)
        return int(port)

    def master(self) -> RedisProcess:
        port = self.master_port()
        return next(n for n in self.nodes if n.port == port)

    def hold_replication(self, master: RedisProcess) -> None:
        """Cut the replicas off ``master`` (their user refused, their links closed): from now on
        they lack what it writes, as behind a slow or broken link. Needs ``password``."""
        assert self.password, "hold_replication needs a deployment with a password"
        with contextlib.closing(self.node_client(master)) as m:
            m.acl_setuser("replicator", enabled=False)
            m.client_kill_filter(user="replicator")

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until every Sentinel knows the replicas and the other Sentinels (else a failover
        could not reach its quorum) and the replicas are in sync."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ok = True
            for node in self.sentinel_nodes:
                client = redis.Redis(host=HOST, port=node.port, socket_timeout=2, **self._sentinel_auth())
                with contextlib.closing(client) as s:
                    state = s.sentinel_master(self.master_name)
                    if (int(state["num-slaves"]) < self.replicas
                            or int(state["num-other-sentinels"]) < self.sentinels - 1):  # fmt: skip
                        ok = False
            if ok:
                with contextlib.closing(self.node_client(self.nodes[0])) as m:
                    info = m.info("replication")
                    if int(info.get("connected_slaves", 0)) >= self.replicas:
                        return
            time.sleep(0.2)
        raise RuntimeError(f"Sentinel deployment not ready in {timeout_s} s")

    def wait_failover(self, old_port: int, timeout_s: float = 60.0) -> float:
        """Seconds until the Sentinels name a master other than ``old_port``."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            with contextlib.suppress(redis.RedisError):
                if self.master_port() != old_port:
                    return time.monotonic() - started
            time.sleep(0.1)
        raise RuntimeError(f"no failover from port {old_port} within {timeout_s} s")

    def close(self) -> None:
        for node in [*self.sentinel_nodes, *self.nodes]:
            node.stop()
