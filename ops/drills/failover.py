"""Redis failover drill: the master dies mid-run and the fleet follows the Sentinels' promotion.

    python ops/drills/failover.py                        # 10,000 images, 2 nodes, down-after 5 s
    python ops/drills/failover.py --images 2000 --down-after-ms 2000 --keep

Real processes on loopback: one Redis master with AOF, two replicas and three Sentinels
(``redis-server --sentinel``; passwords on the servers and on the Sentinels), the local
RecognizeCarNumber server, ``carnumber worker`` nodes and ``carnumber enqueue``, all with
``REDIS_URL=sentinel://...;sentinel://...;sentinel://.../0``, ``CARNUMBER_REDIS_MASTER`` and
``CARNUMBER_SENTINEL_PASSWORD``. When a third of the images are written the master is SIGKILLed;
the Sentinels promote a replica after ``--down-after-ms``; the old master's host comes back a
little later (the Sentinels make it a replica). The drill waits for the run to finish (or to stop
making progress), compacts and audits the output, and prints: the replication lag sampled just
before the kill (what the promoted replica may lack), seconds to the promotion and until parts are
written again, images missing and duplicated, extra calls, and the run's own counters beside the
output (a counter the promotion lost shows as a difference). Exit 1 when an image is missing or
duplicated, the run does not finish, or the extra calls exceed the bound (the calls the nodes can
have in flight, plus, with ``--hold-replicas-s``, the calls answered while the replicas were held
back: their journal entries are what the promoted replica lacks). A run the promotion left
looking done is repaired by the fleet (``workers/books/repair.py``); the drill waits for that.
``tests/test_failover_drill.py`` runs a short version.

What an asynchronous replica can lack after a promotion is the master's last writes (replication
lag, sampled here): queued chunk messages, ``unacked`` entries and acks, journal answers, part
marks and run counters, quota and rate-limit state. ``ops/design/redis.md`` says which of them the
fleet repairs by itself and which it cannot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ocrserver.server import spawn_server
from ocrserver.truth import write_test_archive
from ops.drills.harness import KEY_ID, SECRET, Audit, Drill, audit, drill_dir
from ops.drills.redis_nodes import SentinelDeployment
from workers.keys import Keys
from workers.node.watchdog import WATCH_S
from workers.redis_connect import sync_client

__all__ = ["FailoverResult", "SentinelDrill", "failover", "main"]

SERVERS_PASSWORD = "drill-servers-pw"
SENTINELS_PASSWORD = "drill-sentinels-pw"


class _SentinelRedis:
    """What a :class:`Drill` needs of its Redis (``url``, ``stop``), for a Sentinel deployment."""

    def __init__(self, deployment: SentinelDeployment) -> None:
        self.deployment = deployment

    @property
    def url(self) -> str:
        return self.deployment.url

    def stop(self, kill: bool = False) -> None:
        self.deployment.close()


@dataclass
class SentinelDrill(Drill):
    """A :class:`Drill` whose Redis is a Sentinel deployment (nodes, producer, audit unchanged)."""

    down_after_ms: int = 5000
    deployment: SentinelDeployment | None = None

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.deployment = SentinelDeployment(
            self.work / "redis", down_after_ms=self.down_after_ms, password=SERVERS_PASSWORD,
            sentinel_password=SENTINELS_PASSWORD,
        ).start()  # fmt: skip
        self.redis = _SentinelRedis(self.deployment)  # type: ignore[assignment]
        self.extra_env = {
            "CARNUMBER_REDIS_MASTER": self.deployment.master_name,
            "CARNUMBER_SENTINEL_PASSWORD": SENTINELS_PASSWORD,
            **self.extra_env,
        }
        self.server = spawn_server(
            ["--host", "127.0.0.1", "--latency-ms", str(self.latency_ms), *self.server_args],
            env={**os.environ, "CARNUMBER_SERVER_KEYS": f"{KEY_ID}:{SECRET}"},
        )
        self.archive = self.work / "archive"
        if not self.archive.exists():
            write_test_archive(self.archive, self.images)
        self.client = sync_client(
            self.deployment.url, master_name=self.deployment.master_name,
            sentinel_password=SENTINELS_PASSWORD, socket_timeout=5, socket_connect_timeout=2,
        )  # fmt: skip


@dataclass
class FailoverResult:
    audit: Audit
    bound_extra_calls: int
    finished: bool
    lag_bytes: int  # master offset minus the furthest replica's, sampled just before the kill
    promotion_s: float  # from the kill until the Sentinels name a new master
    recovery_s: float  # from the kill until parts are counted as written again
    total_s: float
    counters: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.finished and self.audit.ok(self.bound_extra_calls)

    def line(self) -> str:
        a = self.audit
        return (
            f"failover       archive={a.archive} output={a.in_output} missing={a.missing} "
            f"duplicated={a.duplicated} calls={a.calls} extra={a.extra_calls} "
            f"(bound {self.bound_extra_calls}) lag_bytes={self.lag_bytes} "
            f"promotion_s={self.promotion_s:.1f} recovery_s={self.recovery_s:.1f} "
            f"finished={self.finished} total_s={self.total_s:.1f} {'OK' if self.ok else 'MISS'}"
        )


def _offset(d: SentinelDrill, node: Any, field: str) -> int | None:
    assert d.deployment is not None
    with contextlib.closing(d.deployment.node_client(node)) as c, contextlib.suppress(Exception):
        return int(c.info("replication")[field])
    return None


def _replicas_behind(d: SentinelDrill, master: Any, hold_s: float) -> int:
    """Replication lag in stream bytes: how much of the master's history the most advanced
    replica lacks now. With ``hold_s`` the replicas are first cut off the master for that long
    (:meth:`SentinelDeployment.hold_replication`), as a slow or broken link would hold them back."""
    assert d.deployment is not None
    if hold_s > 0:
        d.deployment.hold_replication(master)
        time.sleep(hold_s)
    master_offset = _offset(d, master, "master_repl_offset") or 0
    replicas = [n for n in d.deployment.nodes if n is not master and n.alive()]
    offsets = [o for n in replicas if (o := _offset(d, n, "slave_repl_offset")) is not None]
    return max(0, master_offset - max(offsets, default=0))


def failover(
    d: SentinelDrill,
    nodes: int = 2,
    restart_old: bool = True,
    hold_s: float = 0.0,
    timeout_s: float = 900.0,
) -> FailoverResult:
    assert d.deployment is not None
    started = time.monotonic()
    for _ in range(nodes):
        d.start_node()
    producer = d.start_producer()
    d.wait_for("a third written", lambda s: s.written >= d.images // 3, timeout_s)
    victim = d.deployment.master()
    calls_before_hold = d.server_calls()
    lag = _replicas_behind(d, victim, hold_s)
    victim.kill()
    # Calls answered while the replicas were held back: their journal entries (and the outcome
    # bits of parts written meanwhile) are what the promoted replica lacks, so each may be paid
    # once more. The bound counts them, with the calls in flight at the kill.
    calls_in_lag = d.server_calls() - calls_before_hold if hold_s > 0 else 0
    killed_at = time.monotonic()
    print(f"  master {victim.name} (port {victim.port}) SIGKILLed; replication lag {lag} bytes", flush=True)
    promotion = d.deployment.wait_failover(victim.port, timeout_s=120)
    print(f"  Sentinels promoted port {d.deployment.master_port()} after {promotion:.1f} s", flush=True)
    # Parts counted again on the new master (its count may start below the old master's).
    first = None
    while time.monotonic() - killed_at < timeout_s:
        s = d.summary()
        if s is not None:
            if first is None:
                first = s.written
            elif s.written > first or d.finished(s):
                break
        time.sleep(0.1)
    recovery = time.monotonic() - killed_at
    print(f"  parts written again {recovery:.1f} s after the kill", flush=True)
    if restart_old:
        victim.start()  # the host comes back: the Sentinels turn it into a replica
    rc = producer.wait(timeout_s)
    finished = _wait_finished(d, timeout_s, stall_s=max(120.0, 4 * d.lease_s))
    # A run that looks done is compared once with the producer's records by the stalled-run
    # repair (workers/books/repair.py, a round every WATCH_S): chunks the promotion uncounted are
    # published again then. Wait for that look, then for the run to finish again.
    looked = _wait_until(
        lambda: d.client.hget(Keys(d.prefix).run(d.run_id), "records_checked") is not None, 2 * WATCH_S + 15
    )
    if looked is not None:
        finished = _wait_finished(d, timeout_s, stall_s=max(120.0, 4 * d.lease_s))
    # An ack sent while Redis was down is lost: the message stays in unacked until its lease
    # runs out, is delivered again and skipped (its part is written). Count that in the calls.
    drained = _wait_until(lambda: d.client.hlen("unacked") == 0, 3 * d.lease_s + 30)
    total = time.monotonic() - started
    s = d.summary()
    # What the operator's check says (before the audit compacts the run).
    verify = subprocess.run(
        [sys.executable, "-m", "carnumber.cli", "verify", d.run_id, "--json"], env=d.env(),
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    result_audit = audit(d)
    counters = {
        # The producer's own count, written when its enqueue completes (after the failover),
        # beside what Redis counted per chunk (the promotion may have lost some of those).
        "published": sum(e.published for e in s.enqueues) if s else None,
        "enqueued": s.enqueued if s else None,
        "written": s.written if s else None,
        "parked": s.parked if s else None,
        "state": s.state if s else None,
        "republished_auto": int(s.fields.get("images_republished_auto", 0)) if s else None,
        "unacked_left": d.client.hlen("unacked"),
        "queued_left": d.client.llen(d.env()["CARNUMBER_QUEUE"]),
    }
    notes = {
        "producer_rc": rc,
        "nodes_exited": sum(1 for n in d.nodes if not n.alive()),
        "unacked_drained_s": drained,
        "repair_looked_after_s": looked,
        "verify_rc": verify.returncode,
        "verify": _verify_counts(verify.stdout),
        "old_master_replica_after_s": (
            _wait_until(lambda: _role(d, victim) == "slave", 120) if restart_old else None
        ),
    }
    in_flight = d.concurrency if d.pool == "threads" else d.processes * d.concurrency
    bound = nodes * in_flight + calls_in_lag
    notes["calls_in_lag"] = calls_in_lag
    return FailoverResult(result_audit, bound, finished, lag, promotion, recovery, total, counters, notes)


def _verify_counts(stdout: str) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        doc = json.loads(stdout)
        return {k: v for k, v in doc.items() if isinstance(v, int)}
    return {}


def _role(d: SentinelDrill, node: Any) -> str | None:
    assert d.deployment is not None
    with contextlib.closing(d.deployment.node_client(node)) as c, contextlib.suppress(Exception):
        return str(c.info("replication")["role"])
    return None


def _wait_until(done: Any, timeout_s: float) -> float | None:
    """Seconds until ``done()`` holds (None: not within ``timeout_s``); Redis errors count as no."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        with contextlib.suppress(Exception):
            if done():
                return round(time.monotonic() - started, 1)
        time.sleep(0.5)
    return None


def _wait_finished(d: Drill, timeout_s: float, stall_s: float) -> bool:
    """True when the run finishes; False when nothing more is written for ``stall_s`` (what the
    promotion lost never comes back by itself) or at ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        s = d.summary()
        if s is not None:
            if d.finished(s):
                return True
            if s.written != last:
                last, last_change = s.written, time.monotonic()
        if time.monotonic() - last_change > stall_s:
            print(f"  no progress for {stall_s:.0f} s: {s}", flush=True)
            return False
        time.sleep(0.5)
    return False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--nodes", type=int, default=2, help="worker nodes (default 2)")
    p.add_argument("--down-after-ms", type=int, default=5000, help="Sentinels' down-after-milliseconds")
    p.add_argument("--lease-s", type=float, default=45.0, help="CARNUMBER_LEASE_S for the workers")
    p.add_argument("--chunk-size", type=int, default=200)
    p.add_argument("--no-restart", action="store_true", help="leave the old master down")
    p.add_argument(
        "--hold-replicas-s", type=float, default=0.0,
        help="cut the replicas off the master this long before the kill, so that the promoted one "
        "lacks that much of the master's last writes (default 0: only the lag there is)",
    )  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, Redis data)")
    p.add_argument("--json", action="store_true", help="print the result as JSON too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    d = SentinelDrill(
        drill_dir("failover"), images=args.images, lease_s=args.lease_s, chunk_size=args.chunk_size,
        down_after_ms=args.down_after_ms,
    )  # fmt: skip
    try:
        print(f"failover: {args.images} images, {args.nodes} nodes, down-after {args.down_after_ms} ms, "
              f"lease {args.lease_s:.0f} s, work dir {d.work}", flush=True)  # fmt: skip
        result = failover(
            d, nodes=args.nodes, restart_old=not args.no_restart, hold_s=args.hold_replicas_s
        )
    finally:
        d.close()
        if not args.keep:
            shutil.rmtree(d.work, ignore_errors=True)
    print(result.line())
    print(f"  run counters: {result.counters}; {result.notes}")
    if args.json:
        print(json.dumps({**asdict(result), "ok": result.ok}, indent=2, default=str))
    return 0 if result.ok else 1


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # a SIGTERM ends the drill through its finally blocks (children stopped)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    os._exit(130)
