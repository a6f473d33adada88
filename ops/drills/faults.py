"""Infrastructure fault drills: the bad night, played for real, with figures.

    python ops/drills/faults.py                      # drills 1-3 at full size (20,000 images)
    python ops/drills/faults.py --only kill-node --images 5000
    python ops/drills/faults.py --only partition     # needs root (network namespaces)
    python ops/drills/faults.py --only soak --images 200000

Each drill runs its own Redis (AOF on), the local RecognizeCarNumber server (replay recognizer,
30 ms latency), real ``carnumber worker`` nodes and the real ``carnumber enqueue``, then compacts
and audits the output against the archive, and prints: images in the archive, in the output,
missing (must be 0), duplicated (must be 0), API calls made against images (extra calls within
the stated bound: the calls in flight at each fault) and the time from the fault to recovery.
Exits 1 when a drill misses a target. Traffic stays on loopback or the drill's own namespaces.

1. ``kill-node``: SIGKILL a whole worker node (main process and pool) three times, replacing it
   each time. Recovery: until every chunk the dead node held runs on another node.
2. ``redis-restart``: stop Redis for 30 s mid-run, start it again. Recovery: from the restart
   until calls flow again.
3. ``producer-kill``: SIGKILL ``carnumber enqueue`` halfway, run the same command again.
4. ``partition``: two nodes on their own network namespaces sharing Redis over veth links; one is
   cut off for 60 s, then let back.
5. ``soak``: many images with the retry fault mix; worker RSS and Redis memory sampled.
6. ``rolling-restart``: SIGTERM each of three nodes in turn at a limit of 20 calls/s, replacing
   each. Recovery: SIGTERM to exit; notes: images handed back, call-seconds lost per restart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.drills.harness import Audit, Drill, audit, drill_dir

__all__ = ["Result", "kill_node", "main", "producer_kill", "redis_restart"]


@dataclass
class Result:
    drill: str
    audit: Audit
    bound_extra_calls: int
    recovery_s: list[float]
    total_s: float
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.audit.ok(self.bound_extra_calls) and self.notes.get("flat", True) is not False

    def line(self) -> str:
        a = self.audit
        rec = ", ".join(f"{r:.1f}" for r in self.recovery_s) or "-"
        return (
            f"{self.drill:14s} archive={a.archive} output={a.in_output} missing={a.missing} "
            f"duplicated={a.duplicated} calls={a.calls} extra={a.extra_calls} "
            f"(bound {self.bound_extra_calls}) "
            f"recovery_s=[{rec}] total_s={self.total_s:.1f} {'OK' if self.ok else 'MISS'}"
        )


def _in_flight(d: Drill) -> int:
    """Calls one node can have in flight: its call slots (threads: one process's; prefork: each
    process has its own)."""
    return d.concurrency if d.pool == "threads" else d.processes * d.concurrency


def kill_node(d: Drill, kills: int = 3, nodes: int = 3, timeout_s: float = 900.0) -> Result:
    started = time.monotonic()
    for _ in range(nodes):
        d.start_node()
    producer = d.start_producer()
    recoveries: list[float] = []
    for k in range(kills):
        target = (k + 1) * d.images // (kills + 1)
        d.wait_for(f"{target} images written", lambda s, t=target: s.written >= t, timeout_s)
        victim = next(n for n in d.nodes if n.alive())
        t_kill = d.redis_time()
        killed_at = time.monotonic()
        victim.kill()
        d.start_node()  # the replacement host comes up
        # Live nodes renew every lease/4: what is still unrenewed after that was the victim's.
        time.sleep(d.lease_s / 4 + 2)
        dead = d.held_since(t_kill)
        deadline = killed_at + timeout_s
        while dead & d.held_since(t_kill) and time.monotonic() < deadline:
            time.sleep(0.25)
        recoveries.append(time.monotonic() - killed_at)
        print(f"  kill {k + 1}: {victim.name} held {len(dead)} chunk(s); running elsewhere after "
              f"{recoveries[-1]:.1f} s", flush=True)  # fmt: skip
    producer.wait(timeout_s)
    d.wait_for("run finished", d.finished, timeout_s)
    total = time.monotonic() - started
    return Result("kill-node", audit(d), kills * _in_flight(d), recoveries, total)


def redis_restart(d: Drill, down_s: float = 30.0, timeout_s: float = 900.0) -> Result:
    started = time.monotonic()
    for _ in range(2):
        d.start_node()
    producer = d.start_producer()
    d.wait_for("a third written", lambda s: s.written >= d.images // 3, timeout_s)
    d.redis.stop()
    print(f"  redis stopped; down for {down_s:.0f} s", flush=True)
    time.sleep(down_s)
    d.redis.start()
    up_at = time.monotonic()
    calls = d.server_calls()
    while d.server_calls() == calls and time.monotonic() - up_at < timeout_s:
        time.sleep(0.1)
    flowing = time.monotonic() - up_at
    print(f"  redis back; calls flowing again after {flowing:.1f} s", flush=True)
    rc = producer.wait(timeout_s)
    d.wait_for("run finished", d.finished, timeout_s)
    total = time.monotonic() - started
    restarts = sum(1 for n in d.nodes if not n.alive())
    notes = {
        "producer_rc": rc,
        "nodes_exited": restarts,
        "producer_log": d.producer_log()[-400:],
    }
    # Calls in flight when Redis went away may be answered but not journalled, on every node.
    return Result("redis-restart", audit(d), 2 * _in_flight(d), [flowing], total, notes)


def producer_kill(d: Drill, timeout_s: float = 900.0) -> Result:
    started = time.monotonic()
    for _ in range(2):
        d.start_node()
    producer = d.start_producer()
    d.wait_for("half enqueued", lambda s: s.enqueued >= d.images // 2, timeout_s)
    producer.send_signal(signal.SIGKILL)
    producer.wait(30)
    killed_at = time.monotonic()
    again = d.enqueue(timeout_s)
    if again.returncode != 0:
        raise RuntimeError(f"second enqueue failed ({again.returncode}): {again.stderr[-2000:]}")
    d.wait_for("run finished", d.finished, timeout_s)
    recovery = time.monotonic() - killed_at
    total = time.monotonic() - started
    # A chunk published but not yet recorded when the producer died is published again: its
    # copy is answered from the journal (or, when both run at once, its claims).
    return Result(
        "producer-kill", audit(d), d.chunk_size, [recovery], total, {"rerun": again.stdout.strip()[-300:]}
    )


def rolling_restart(d: Drill, nodes: int = 3, qps: float = 20.0, timeout_s: float = 900.0) -> Result:
    """SIGTERM each node of the fleet in turn mid-run (as systemd, Compose or Kubernetes do in a
    rolling restart) and start its replacement. Recovery, per node: from SIGTERM until it exited.
    Notes: the images each handed back, and the call-seconds the fleet lost around each restart
    against its limit (``qps``), from the server's per-second counts."""
    started = time.monotonic()
    for _ in range(nodes):
        d.start_node()
    producer = d.start_producer()
    d.wait_for("a fifth written", lambda s: s.written >= d.images // 5, timeout_s)
    exits: list[float] = []
    handed: list[int] = []
    windows: list[tuple[float, float]] = []
    for k in range(nodes):
        victim = next(n for n in d.nodes if n.alive())
        sent_at, sent_wall = time.monotonic(), time.time()
        os.killpg(victim.proc.pid, signal.SIGTERM)
        rc = victim.proc.wait(60)
        exits.append(time.monotonic() - sent_at)
        handed.append(sum(int(w) for w in re.findall(r"(\d+) image\(s\) handed back", victim.tail(200))))
        print(f"  restart {k + 1}: {victim.name} exited {rc} after {exits[-1]:.1f} s, handed back "
              f"{handed[-1]} images", flush=True)  # fmt: skip
        d.start_node()  # its replacement
        windows.append((sent_wall - 1, sent_wall + 10))
        time.sleep(12)
    producer.wait(timeout_s)
    d.wait_for("run finished", d.finished, timeout_s)
    total = time.monotonic() - started
    per_second = {int(s): n for s, n in _server_stats(d)["accepted_per_second"].items()}
    lost = [
        sum(max(0.0, qps - per_second.get(s, 0)) for s in range(int(a), int(b))) / qps for a, b in windows
    ]
    notes = {
        "exit_codes_0": all(n.proc.returncode in (0, None) for n in d.nodes),
        "handed_back": handed,
        "lost_call_seconds": [round(x, 2) for x in lost],
    }
    print(f"  call-seconds lost around each restart (limit {qps:g}/s): {notes['lost_call_seconds']}",
          flush=True)  # fmt: skip
    return Result("rolling-restart", audit(d), 0, exits, total, notes)


def _server_stats(d: Drill) -> dict[str, Any]:
    import httpx

    return dict(httpx.get(f"{d.server.url}/__carnumber/stats", timeout=10).json())


DRILLS = {
    "kill-node": kill_node,
    "redis-restart": redis_restart,
    "producer-kill": producer_kill,
    "rolling-restart": rolling_restart,
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=[*DRILLS, "partition", "soak"], help="run only these")
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--lease-s", type=float, default=45.0, help="CARNUMBER_LEASE_S for the workers")
    p.add_argument("--chunk-size", type=int, default=200)
    p.add_argument(
        "--pool",
        default="threads",
        choices=["threads", "prefork"],
        help="the worker nodes' pool (default: the worker's default, threads)",
    )
    p.add_argument("--keep", action="store_true", help="keep the drills' work directories")
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    return p


def run_one(name: str, args: argparse.Namespace) -> Result:
    # The rolling restart runs at a limit (what a night runs at), so a lost node shows as lost calls.
    extra = {"CARNUMBER_QPS": "20"} if name == "rolling-restart" else {}
    chunk_size = min(args.chunk_size, 50) if name == "rolling-restart" else args.chunk_size
    d = Drill(
        drill_dir(name),
        images=args.images,
        lease_s=args.lease_s,
        chunk_size=chunk_size,
        pool=args.pool,
        extra_env=extra,
    )
    try:
        print(f"{name}: {args.images} images, lease {args.lease_s:.0f} s, work dir {d.work}", flush=True)
        return DRILLS[name](d)
    finally:
        d.close()
        if not args.keep:
            shutil.rmtree(d.work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = args.only or list(DRILLS)
    results: list[Result] = []
    for name in names:
        if name == "partition":
            from ops.drills.partition import partition_drill

            results.append(partition_drill(args))
        elif name == "soak":
            from ops.drills.soak import soak_drill

            results.append(soak_drill(args))
        else:
            results.append(run_one(name, args))
        print(results[-1].line(), flush=True)
    print("\nsummary")
    for r in results:
        print("  " + r.line())
    if args.json:
        print(json.dumps([{**asdict(r), "ok": r.ok} for r in results], indent=2, default=str))
    return 0 if all(r.ok for r in results) else 1


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # a SIGTERM ends the drill through its finally blocks (children stopped)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    os._exit(130)
