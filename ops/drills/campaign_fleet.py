"""The fault campaign's fleet: the drill's world (its Redis, the local server, the worker nodes,
the producer and the operator's commands) as the runner drives it. Every action is an
:class:`Op` in the history, with its start and end (epoch seconds, the server's clock too),
exit code, the tail of its output and, for a fault, the calls it may cost (the documented bound:
the calls in flight on the nodes it hit).

Every wait is bounded: commands by a timeout (then killed and marked ``timed_out``), nodes by
SIGKILL after a grace, the supervisor by a cap on restarts.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ops.drills.campaign_gen import Schedule
from ops.drills.harness import Drill, Node
from ops.drills.partition import Hosts

__all__ = ["Fleet", "NodeInfo", "Op", "first_json"]

TAIL = 2500  # characters of a command's output kept in the history
ROOT = str(Path(__file__).resolve().parents[2])
MAX_RESTARTS = 30  # the supervisor gives up on a crash loop after this many starts
RESTART_DELAY_S = 2.0  # systemd's RestartSec


@dataclass
class Op:
    kind: str  # an event kind, or enqueue / node-start / supervisor-restart / operator:...
    what: str
    phase: str  # "schedule" or "finish"
    start: float
    end: float | None = None
    rc: int | None = None
    out: str = ""
    bound: int = 0  # calls this fault may cost: the calls in flight on what it hit
    recovery_s: float | None = None
    timed_out: bool = False
    note: str = ""
    doc: dict[str, Any] = field(default_factory=dict)  # the JSON object a `--json` command printed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class NodeInfo:
    node: Node
    started: float
    ns: bool
    in_flight: int
    signals: list[str] = field(default_factory=list)  # what the campaign sent it, in order
    exited: float | None = None
    rc: int | None = None
    restarted: bool = False  # the supervisor has started its successor

    @property
    def name(self) -> str:
        return self.node.name

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "started": self.started, "ns": self.ns, "in_flight": self.in_flight,
            "signals": self.signals, "exited": self.exited, "rc": self.rc, "alive": self.node.alive(),
            "tail": "" if self.rc in (None, -9) else self.node.tail(40),
        }  # fmt: skip


class Fleet:
    """The nodes, producers and commands of one schedule, and the history of what was done."""

    def __init__(
        self, drill: Drill, schedule: Schedule, sources: Sequence[Path], hosts: Hosts | None,
        say: Callable[[str], None],
    ) -> None:  # fmt: skip
        self.d = drill
        self.s = schedule
        self.sources = list(sources)
        self.hosts = hosts
        self.say = say
        self.ops: list[Op] = []
        self.nodes: list[NodeInfo] = []
        self.lock = threading.RLock()
        self.redis_lock = threading.Lock()
        self.phase = "schedule"
        self.t0 = time.time()
        self.supervising = schedule.supervisor
        self.enqueues: dict[int, list[tuple[subprocess.Popen[bytes] | None, Op]]] = {}
        self._done = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    # -- history ----------------------------------------------------------------------------
    def record(self, op: Op) -> Op:
        with self.lock:
            self.ops.append(op)
        return op

    def note(self, op: Op, rc: int | None = None, out: str = "") -> Op:
        op.end = time.time()
        op.rc = rc
        op.out = _keep(out)
        if "--json" in op.what.split():
            op.doc = first_json(out)
        bound = f" (bound {op.bound})" if op.bound else ""
        status = "TIMED OUT" if op.timed_out else f"rc={rc}" if rc is not None else "done"
        if rc not in (None, 0, -9) and op.out.strip():
            status += ": " + op.out.strip().splitlines()[-1][:200]
        self.say(f"t+{op.start - self.t0:6.1f}s {op.kind}: {op.what}{bound} -> {status}"
                 + (f" [{op.note}]" if op.note else ""))  # fmt: skip
        return op

    def recovered(self, op: Op, what: str = "what it held runs elsewhere") -> None:
        """Print the recovery measured after ``op`` (its end stays the fault's)."""
        took = f"after {op.recovery_s:.1f} s" if op.recovery_s is not None else "not seen"
        self.say(f"t+{op.start - self.t0:6.1f}s {op.kind}: {what} {took}")

    # -- nodes --------------------------------------------------------------------------------
    def in_flight(self) -> int:
        p = self.s.params
        return p.concurrency if self.d.pool == "threads" else p.processes * p.concurrency

    def start_node(self, ns: bool = False, why: str = "node-start") -> NodeInfo:
        prefix: list[str] = []
        env: dict[str, str] = {}
        if ns and self.hosts is not None:
            gw = self.hosts.gateway(0)
            prefix = ["ip", "netns", "exec", self.hosts.name(0)]
            env = {
                "REDIS_URL": f"redis://{gw}:{self.d.redis.port}/0",
                "CARNUMBER_ENDPOINT": f"http://{gw}:{str(self.d.server.url).rsplit(':', 1)[-1]}",
            }
        with self.lock:
            node = self.d.start_node(prefix_cmd=prefix, env=env)
            info = NodeInfo(node, time.time(), ns and self.hosts is not None, self.in_flight())
            self.nodes.append(info)
        op = self.record(
            Op(why, f"{node.name}{' on its test host' if info.ns else ''}", self.phase, info.started)
        )
        self.note(op)
        return info

    def alive(self) -> list[NodeInfo]:
        with self.lock:
            return [n for n in self.nodes if n.node.alive()]

    def choose(self, args: dict[str, Any], spare: int = 0, ns_only: bool = False) -> list[NodeInfo]:
        """The nodes an event hits: by name (``node``), every live node (``victims: all``), or
        ``pick`` fractions of the live nodes in start order; ``spare`` nodes are left alive."""
        with self.lock:
            alive = [n for n in self.alive() if n.ns or not ns_only]
            if "node" in args:
                return [n for n in alive if n.name == args["node"]]
            if args.get("victims") == "all":
                return alive
            count = min(len(args.get("pick", [])), max(0, len(alive) - spare))
            chosen = []
            for f in args.get("pick", [])[:count]:
                chosen.append(alive.pop(min(len(alive) - 1, int(float(f) * len(alive)))))
            return chosen

    def send(self, info: NodeInfo, sig: signal.Signals) -> None:
        info.signals.append(sig.name)
        info.node.signal(sig)

    def _watch(self) -> None:
        """Note each node's exit; as the supervisor, start again a node that exited by itself."""
        restarts = 0
        while not self._done.wait(0.5):
            for info in list(self.nodes):
                rc = info.node.proc.poll()
                if rc is None or info.exited is not None:
                    continue
                info.exited, info.rc = time.time(), rc
                ours = any(s in ("SIGKILL", "SIGTERM") for s in info.signals)
                if not ours:
                    self.say(f"t+{info.exited - self.t0:6.1f}s {info.name} exited by itself, rc={rc}:\n"
                             + _indent(info.node.tail(8)))  # fmt: skip
                if not ours and self.supervising and restarts < MAX_RESTARTS:
                    restarts += 1
                    threading.Thread(target=self._restart, args=(info,), daemon=True).start()

    def _restart(self, info: NodeInfo) -> None:
        time.sleep(RESTART_DELAY_S)
        if self._done.is_set():
            return
        info.restarted = True
        self.start_node(ns=info.ns, why="supervisor-restart")

    def watch(self) -> None:
        self._watcher.start()

    # -- commands -----------------------------------------------------------------------------
    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "carnumber.cli", *args]

    def cmd(self, kind: str, args: Sequence[str], timeout_s: float | None = None) -> Op:
        """Run ``carnumber ARGS`` to its end (bounded) and record it."""
        timeout = timeout_s or self.s.params.redis_outage_s + 120.0
        op = self.record(Op(kind, "carnumber " + " ".join(args), self.phase, time.time()))
        try:
            argv, env = self.argv(*args), self.d.env()
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
            return self.note(op, done.returncode, done.stdout + done.stderr)
        except subprocess.TimeoutExpired as exc:
            op.timed_out = True
            out = (exc.stdout or b"") + (exc.stderr or b"")
            return self.note(op, None, out.decode(errors="replace") if isinstance(out, bytes) else str(out))

    def enqueue(self, index: int, why: str = "enqueue") -> Op:
        """``carnumber enqueue SOURCE --run RUN`` in the background; its op ends when it exits."""
        log = self.d.work / f"enqueue-{index}-{len(self.enqueues.get(index, []))}.log"
        argv = ["enqueue", str(self.sources[index]), "--run", self.d.run_id]
        op = self.record(Op(why, "carnumber " + " ".join(argv), self.phase, time.time()))
        with log.open("wb") as out:
            proc = subprocess.Popen(self.argv(*argv), env=self.d.env(), stdout=out, stderr=subprocess.STDOUT)
        with self.lock:
            self.enqueues.setdefault(index, []).append((proc, op))

        def wait() -> None:
            rc = proc.wait()  # bounded: close() kills what is still running
            self.note(op, rc, log.read_text(errors="replace"))

        threading.Thread(target=wait, daemon=True).start()
        return op

    def running_enqueues(self) -> list[tuple[int, subprocess.Popen[bytes], Op]]:
        with self.lock:
            return [
                (i, p, op) for i, runs in self.enqueues.items() for p, op in runs if p and p.poll() is None
            ]

    def unfinished_sources(self) -> list[int]:
        """Sources whose latest enqueue ended without exit 0 (killed, stopped early, failed)."""
        with self.lock:
            return [
                i for i, runs in self.enqueues.items() if runs[-1][0] and runs[-1][0].poll() not in (0, None)
            ]

    def wait_enqueues(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for _, proc, op in self.running_enqueues():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                op.timed_out = True
                proc.kill()
                proc.wait(10)

    # -- the end ----------------------------------------------------------------------------------
    def close(self) -> None:
        self._done.set()
        for _, proc, op in self.running_enqueues():
            op.timed_out = True
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for info in self.nodes:
            info.node.thaw()
            info.node.kill()


def first_json(text: str) -> dict[str, Any]:
    """The first JSON object in a command's output (``--json`` prints one; logs may follow)."""
    start = text.find("{")
    while start >= 0:
        try:
            doc = json.JSONDecoder().raw_decode(text[start:])[0]
            return doc if isinstance(doc, dict) else {}
        except ValueError:
            start = text.find("{", start + 1)
    return {}


def _keep(out: str) -> str:
    """The tail of a command's output; for a traceback, first the frames in this project's code
    (the tail alone shows only the library's)."""
    if len(out) <= TAIL:
        return out
    ours = [
        line.strip()
        for line in out.splitlines()
        if line.strip().startswith(f'File "{ROOT}/') and "/.venv/" not in line
    ]
    head = "our frames:\n" + "\n".join(ours[-12:]) + "\n[...]\n" if ours else "[...]\n"
    return head + out[-TAIL:]


def _indent(text: str) -> str:
    return "\n".join("      " + line for line in text.splitlines())
