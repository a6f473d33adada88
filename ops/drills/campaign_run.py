"""The fault campaign's *runner*: plays a :class:`~ops.drills.campaign_gen.Schedule` against a
real fleet and returns its *history* (a JSON-able dict) for the checker.

The world is :class:`ops.drills.harness.Drill`'s: its own Redis with AOF, the local server
(replay recognizer), real ``carnumber worker`` nodes (process groups), the real ``carnumber
enqueue`` and operator commands. Each event runs on a thread of its own at its moment, so faults
overlap as the schedule says; Redis events never overlap (the generator spaces them).

After the schedule the runner finishes the run as an operator would, following the runbook
(ops/README.md, "A run does not verify"), in at most :data:`ROUNDS` rounds and ``finish_s``
seconds: start workers if none is left, ``resume`` a held run (``--force`` a cancelled one), run
again every ``enqueue`` that did not exit 0, follow the run, ``compact``, ``verify``; then
``retry-failures`` for retryable failures, or ``verify --republish`` for missing images of a run
that says it is done. Then it records the final state: the listing of every source, the outcomes
after compaction, the server's calls per picture, ``verify``, ``report`` and ``status``, and
every node's fate.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from ops.drills.campaign_archive import Listing, build_sources, list_source
from ops.drills.campaign_fleet import Fleet, NodeInfo, Op
from ops.drills.campaign_gen import Event, Schedule
from ops.drills.harness import Drill
from ops.drills.partition import Hosts

__all__ = ["ROUNDS", "play"]

ROUNDS = 5  # the operator's finishing rounds
HELD = ("paused", "cancelled", "stopped", "quota_exhausted", "circuit_open", "redis_unavailable")
RESUME_SETTLE_S = 3.0  # a chunk re-published by resume reaches a worker (and is parked again) by then
TERM_GRACE_S = 60.0  # a SIGTERMed node finishes its chunks this long, then it is SIGKILLed


class Runner:
    def __init__(self, schedule: Schedule, work: Path, say: Callable[[str], None]) -> None:
        self.s = schedule
        self.p = schedule.params
        self.work = work
        self.say = say
        self.hosts: Hosts | None = None
        self.fleet: Fleet | None = None
        self.drill: Drill | None = None
        self.corpus: dict[str, Listing] = {}

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> Fleet:
        p, s = self.p, self.s
        sources, self.corpus = build_sources(
            self.work, p.images, p.bad_inputs, s.second_copies, s.second_new, s.seed or 0
        )
        also_bind: list[str] = []
        if s.ns_nodes:
            self.hosts = Hosts(tag=str(os.getpid() % 100000), n=1, base=2 + os.getpid() % 240)
            self.hosts.up()
            also_bind = [self.hosts.gateway(0)]
        env = {
            "CARNUMBER_QPS": f"{p.qps:g}",
            "CARNUMBER_QUEUE_HIGH_WATER": str(p.high_water),
            "CARNUMBER_REDIS_OUTAGE_S": f"{p.redis_outage_s:g}",
            "CARNUMBER_QUOTA_WINDOW": "total",
            **({"CARNUMBER_QUOTA": str(s.quota)} if s.quota is not None else {}),
        }
        self.drill = Drill(
            self.work, images=p.images, chunk_size=p.chunk_size, concurrency=p.concurrency,
            processes=p.processes, lease_s=p.lease_s, latency_ms=p.latency_ms, also_bind=also_bind,
            extra_env=env, run_id="campaign",
        )  # fmt: skip
        self.fleet = Fleet(self.drill, s, sources, self.hosts, self.say)
        return self.fleet

    # -- events --------------------------------------------------------------------------------
    def fire(self, e: Event) -> None:
        f = self.fleet
        assert f is not None
        handler = getattr(self, "_" + e.kind.replace("-", "_"))
        try:
            handler(e, f)
        except Exception as exc:
            f.note(
                f.record(Op(e.kind, f"runner error: {type(exc).__name__}: {exc}", f.phase, time.time())), -1
            )

    def fire_at_tail(self, e: Event) -> None:
        """Fire ``e`` at the run's tail: no producer running, the queue empty, and no more chunks
        held than live nodes (most hold one or none); bounded: after the bound it fires anyway."""
        d, f = self.drill, self.fleet
        assert d is not None and f is not None
        deadline = time.monotonic() + 3 * self.p.horizon_s() + self.p.redis_outage_s
        while time.monotonic() < deadline:
            try:
                s = d.summary()
                if s is None or d.finished(s):
                    break
                queued = d.client.llen(d.env()["CARNUMBER_QUEUE"])
                held = d.client.hlen("unacked")  # kombu's: messages delivered, not yet acked
                if queued == 0 and 0 < held <= len(f.alive()) and f.enqueues and not f.running_enqueues():
                    break
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.2)
        time.sleep(float(e.args.get("after_s", 0.0)))
        self.fire(e)

    def _kill(self, e: Event, f: Fleet) -> None:
        replace = bool(e.args.get("replace"))
        victims = f.choose(dict(e.args), spare=0 if replace else 1)
        op = f.record(Op("kill", "SIGKILL " + (", ".join(v.name for v in victims) or "nobody"), f.phase,
                         time.time(), bound=sum(v.in_flight for v in victims)))  # fmt: skip
        t_fault = self._redis_time()
        for v in victims:
            f.send(v, signal.SIGKILL)
        for v in victims:
            v.node.proc.wait(30)
        f.note(op, 0)
        if replace:
            for _ in victims:
                f.start_node(why="node-start (replacement)")
        if victims:
            self._lease_recovery(op, t_fault)
            f.recovered(op)

    def _join(self, e: Event, f: Fleet) -> None:
        for _ in range(int(e.args.get("nodes", 1))):
            f.start_node(why="join")

    def _term(self, e: Event, f: Fleet) -> None:
        victims = f.choose(dict(e.args), spare=0 if e.args.get("replace") else 1)
        for v in victims:
            op = f.record(Op("term", f"SIGTERM {v.name}", f.phase, time.time()))
            if e.args.get("replace"):
                f.start_node(why="node-start (rolling restart)")
            self._terminate(f, v, op)

    def _terminate(self, f: Fleet, v: NodeInfo, op: Op) -> None:
        v.node.thaw()
        f.send(v, signal.SIGTERM)
        try:
            rc = v.node.proc.wait(TERM_GRACE_S)
        except Exception:
            op.note = f"still running {TERM_GRACE_S:.0f} s after SIGTERM: SIGKILLed"
            op.bound = v.in_flight
            f.send(v, signal.SIGKILL)
            rc = v.node.proc.wait(30)
        f.note(op, rc)

    def _stop(self, e: Event, f: Fleet) -> None:
        victims = f.choose(dict(e.args), spare=1)
        if not victims:
            f.note(f.record(Op("stop", "nobody to stop", f.phase, time.time())), None)
            return
        v = victims[0]
        op = f.record(
            Op("stop", f"SIGSTOP {v.name} for {e.args['for_s']} s", f.phase, time.time(), bound=v.in_flight)
        )
        t_fault = self._redis_time()
        f.send(v, signal.SIGSTOP)
        watcher = threading.Thread(target=self._lease_recovery, args=(op, t_fault), daemon=True)
        watcher.start()
        time.sleep(float(e.args["for_s"]))
        f.send(v, signal.SIGCONT)
        f.note(op, 0)
        watcher.join(3 * self.p.lease_s + 60)
        f.recovered(op)

    def _cut(self, e: Event, f: Fleet) -> None:
        victims = f.choose(dict(e.args), ns_only=True) if self.hosts else []
        if not victims or self.hosts is None:
            f.note(f.record(Op("cut", "no node on the test host", f.phase, time.time())), None)
            return
        op = f.record(Op("cut", f"{victims[0].name} cut off for {e.args['for_s']} s", f.phase, time.time(),
                         bound=sum(v.in_flight for v in victims)))  # fmt: skip
        t_fault = self._redis_time()
        self.hosts.cut(0)
        watcher = threading.Thread(target=self._lease_recovery, args=(op, t_fault), daemon=True)
        watcher.start()
        time.sleep(float(e.args["for_s"]))
        self.hosts.heal(0)
        f.note(op, 0)
        watcher.join(3 * self.p.lease_s + 60)
        f.recovered(op)

    def _redis(self, e: Event, f: Fleet) -> None:
        d = self.drill
        assert d is not None
        if not f.redis_lock.acquire(blocking=False):
            f.note(f.record(Op(e.kind, "Redis is down already", f.phase, time.time())), None)
            return
        try:
            kill = e.args.get("signal") == "KILL"
            bound = sum(n.in_flight for n in f.alive())
            if kill:  # AOF everysec: the last second of journal writes may be lost
                bound += int(self.p.qps) if self.p.qps > 0 else bound
            down = float(e.args["down_s"])
            op = f.record(Op(e.kind, f"Redis SIG{'KILL' if kill else 'TERM'}, down {down:g} s", f.phase,
                             time.time(), bound=bound))  # fmt: skip
            d.redis.stop(kill=kill)
            time.sleep(max(0.0, down - (time.time() - op.start)))
            d.redis.start()
            f.note(op, 0)
            back = time.time()
            calls = d.server_calls()
            deadline = back + 2 * self.p.lease_s + 60
            while time.time() < deadline and d.server_calls() == calls and not self._idle():
                time.sleep(0.2)
            if d.server_calls() != calls:
                op.recovery_s = round(time.time() - back, 2)
            f.recovered(op, "calls flowing again")
        finally:
            f.redis_lock.release()

    _redis_blip = _redis_long = _redis_past = _redis

    def _producer_kill(self, e: Event, f: Fleet) -> None:
        running = f.running_enqueues()
        if not running:
            f.note(f.record(Op("producer-kill", "no producer running", f.phase, time.time())), None)
            return
        index, proc, enq = running[0]
        op = f.record(Op("producer-kill", f"SIGKILL {enq.what}", f.phase, time.time()))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        f.note(op, 0)
        time.sleep(float(e.args.get("again_after_s", 0.0)))
        f.enqueue(index, why="enqueue (again)")

    def _enqueue_corpus(self) -> None:
        f = self.fleet
        assert f is not None
        for index, src in enumerate(f.sources):
            if str(src) in self.corpus:
                f.enqueue(index, why="enqueue (bad-input corpus)")
                proc = f.enqueues[index][-1][0]
                if proc is not None:
                    proc.wait()  # bounded: each ends, or is killed at the end of the finish

    def _second_source(self, e: Event, f: Fleet) -> None:
        second = [i for i, src in enumerate(f.sources) if src.name == "second"]
        if second:
            f.enqueue(second[0])

    def _pause(self, e: Event, f: Fleet) -> None:
        f.cmd("pause", ["pause", "campaign"])
        time.sleep(float(e.args.get("resume_after_s", 5.0)))
        self._resume(f, f.cmd("pause", ["resume", "campaign"]))

    def _cancel(self, e: Event, f: Fleet) -> None:
        f.cmd("cancel", ["cancel", "campaign"])
        time.sleep(float(e.args.get("resume_after_s", 5.0)))
        self._resume(f, f.cmd("cancel", ["resume", "campaign", "--force"]))

    def _resume(self, f: Fleet, op: Op) -> None:
        """Note the run's state a few seconds after a resume (a run still held was not resumed)."""
        time.sleep(RESUME_SETTLE_S)
        state = f.cmd("status", ["status", "campaign", "--json", "--no-workers"], 60).doc.get("state")
        op.note = f"state {RESUME_SETTLE_S:g} s later: {state}"

    def _verify_republish(self, e: Event, f: Fleet) -> None:
        f.cmd("verify-republish", ["verify", "campaign", "--republish"])

    def _retry_failures(self, e: Event, f: Fleet) -> None:
        f.cmd("retry-failures", ["retry-failures", "campaign"])

    def _compact(self, e: Event, f: Fleet) -> None:
        f.cmd("compact", ["compact", "campaign"])

    def _status(self, e: Event, f: Fleet) -> None:
        f.cmd("status", ["status", "campaign", "--json", "--no-workers"])

    def _report(self, e: Event, f: Fleet) -> None:
        f.cmd("report", ["report", "campaign", "--json"])

    def _quota_raise(self, e: Event, f: Fleet) -> None:
        """The runbook for a spent quota: raise it in the env file, restart the workers, `resume
        RUN --keep-stop`, then the same `enqueue` again (ops/README.md, CarnumberQuotaExhausted)."""
        d = self.drill
        assert d is not None
        d.extra_env = {k: v for k, v in d.extra_env.items() if k != "CARNUMBER_QUOTA"}
        for old in f.alive():
            op = f.record(
                Op("quota-raise", f"restart {old.name} with the quota raised", f.phase, time.time())
            )
            f.start_node(ns=old.ns, why="node-start (quota raised)")
            self._terminate(f, old, op)
        f.cmd("quota-raise", ["resume", "campaign", "--keep-stop"])
        for index in sorted({i for i, _ in enumerate(f.sources) if i in f.enqueues}):
            if not any(i == index for i, _, _ in f.running_enqueues()):
                f.enqueue(index, why="enqueue (after the quota)")

    # -- measuring -------------------------------------------------------------------------------
    def _redis_time(self) -> float:
        d = self.drill
        assert d is not None
        try:
            return d.redis_time()
        except (redis.RedisError, OSError):
            return time.time()

    def _idle(self) -> bool:
        """Whether the run has nothing to call now: done, or held."""
        d = self.drill
        assert d is not None
        s = d.summary()
        return s is None or d.finished(s) or s.state in HELD

    def _lease_recovery(self, op: Op, t_fault: float) -> None:
        """Seconds from the fault until every chunk the hit node held runs elsewhere (its
        delivery tags, unrenewed since the fault, are gone from the lease index)."""
        d = self.drill
        assert d is not None
        time.sleep(self.p.lease_s / 4 + 2)  # every live node has renewed its leases by now
        deadline = time.monotonic() + 3 * self.p.lease_s + 60
        dead: set[str] | None = None
        while time.monotonic() < deadline:
            try:
                held = d.held_since(t_fault)
            except (redis.RedisError, OSError):
                time.sleep(0.5)
                continue
            dead = held if dead is None else dead & held
            if not dead:
                op.recovery_s = round(time.time() - op.start, 2)
                return
            time.sleep(0.25)

    # -- the schedule and the operator's finish --------------------------------------------------
    def play_schedule(self) -> None:
        f = self.fleet
        assert f is not None
        for i in range(self.s.nodes):
            f.start_node(ns=i < self.s.ns_nodes)
        f.watch()
        f.t0 = time.time()
        f.enqueue(0)
        if self.corpus:  # the bad-input corpus's sources, one after the other, into the same run
            threading.Thread(target=self._enqueue_corpus, daemon=True).start()
        threads = []
        for e in self.s.events:
            time.sleep(max(0.0, f.t0 + e.at_s - time.time()))
            target = self.fire_at_tail if e.args.get("when") == "tail" else self.fire
            t = threading.Thread(target=target, args=(e,), daemon=True, name=e.kind)
            t.start()
            threads.append(t)
        bound = time.monotonic() + self.p.redis_outage_s + 3 * self.p.lease_s + 300
        for t in threads:
            t.join(max(0.1, bound - time.monotonic()))
            if t.is_alive():
                f.note(f.record(Op(t.name, "event still running: left behind", f.phase, time.time())), None)

    def finish(self) -> None:
        """Finish the run as an operator would, following what each command says (bounded)."""
        f, d = self.fleet, self.drill
        assert f is not None and d is not None
        f.phase = "finish"
        deadline = time.monotonic() + self.p.finish_s
        for info in f.alive():
            info.node.thaw()
        for _ in range(ROUNDS):
            left = deadline - time.monotonic()
            if left <= 5:
                break
            if not f.alive() and self.s.operator_starts_nodes:  # no supervisor, or it gave up
                for _ in range(self.s.nodes):
                    f.start_node(why="operator: start workers")
            state = f.cmd("operator", ["status", "campaign", "--json", "--no-workers"], 60).doc.get("state")
            if state in HELD:
                f.cmd("operator", ["resume", "campaign", *(["--force"] if state == "cancelled" else [])])
            f.wait_enqueues(max(1.0, (deadline - time.monotonic()) / 2))
            for index in f.unfinished_sources():
                f.enqueue(index, why="operator: enqueue again")
            f.wait_enqueues(max(1.0, (deadline - time.monotonic()) / 2))
            left = deadline - time.monotonic()
            follow = f.cmd("operator", ["status", "campaign", "--follow", "--no-workers", "--timeout-s",
                                        f"{max(1.0, left - 30):.0f}"], max(10.0, left))  # fmt: skip
            if follow.rc != 0:
                continue  # held again (resume next round), or stalled (start workers next round)
            f.cmd("operator", ["compact", "campaign"])
            verify = f.cmd("operator", ["verify", "campaign", "--json"])
            v = verify.doc
            if verify.rc == 0:
                if any(c.get("retryable") for c in v.get("failed_by_code", [])):
                    f.cmd("operator", ["retry-failures", "campaign"])
                    continue
                break
            if v.get("missing") and v.get("state") == "done":
                f.cmd("operator", ["verify", "campaign", "--republish"])

    def collect(self) -> dict[str, Any]:
        """The final state, for the checker; then every node's fate."""
        f, d = self.fleet, self.drill
        assert f is not None and d is not None
        final: dict[str, Any] = {}
        f.phase = "final"
        f.cmd("final", ["compact", "campaign"])
        verify = f.cmd("final", ["verify", "campaign", "--json"])
        report = f.cmd("final", ["report", "campaign", "--json"])
        status = f.cmd("final", ["status", "campaign", "--json", "--no-workers"])
        final["verify"] = {"rc": verify.rc, "json": verify.doc}
        final["report"] = {"rc": report.rc, "calls": report.doc.get("calls")}
        final["status"] = {
            "rc": status.rc,
            "calls": status.doc.get("calls"),
            "state": status.doc.get("state"),
        }
        final["listing"] = [
            (self.corpus.get(str(src)) or list_source(src, d.env())).to_json()
            for src in f.sources
            if _enqueued(f, src)
        ]
        final["outcomes"] = _outcomes(d)
        stats = d.server_stats()
        final["server"] = {"accepted_total": stats.get("accepted_total"), "pictures": d.server_pictures()}
        final["nodes"] = [n.to_json() for n in f.nodes]
        return final


def _enqueued(f: Fleet, src: Path) -> bool:
    return f.sources.index(src) in f.enqueues


def _outcomes(d: Drill) -> dict[str, list[list[Any]]]:
    """Per image id in the output, its rows as ``[status, plate_index]`` (after compaction)."""
    from workers.sink.dataset import open_dataset

    table = open_dataset(str(d.work / "out")).read_run(
        d.run_id, columns=["image_id", "plate_index", "status"]
    )
    rows: dict[str, list[list[Any]]] = {}
    for image, index, status in zip(
        *(table[c].to_pylist() for c in ("image_id", "plate_index", "status")), strict=True
    ):
        rows.setdefault(image, []).append([status, index])
    return rows


def play(schedule: Schedule, work: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Play ``schedule`` in ``work`` and return its history (see the checker for its use)."""
    r = Runner(schedule, work, say)
    history: dict[str, Any] = {"schedule": schedule.to_json(), "errors": []}
    started = time.monotonic()
    try:
        r.setup()
        history["t0"] = time.time()
        r.play_schedule()
        history["schedule_s"] = round(time.monotonic() - started, 1)
        finish_from = time.monotonic()
        r.finish()
        history["finish_s"] = round(time.monotonic() - finish_from, 1)
        history.update(r.collect())
    except Exception as exc:
        history["errors"].append(f"{type(exc).__name__}: {exc}")
    finally:
        if r.fleet is not None:
            history["t0"] = r.fleet.t0
            history["ops"] = [op.to_json() for op in r.fleet.ops]
            history.setdefault("nodes", [n.to_json() for n in r.fleet.nodes])
            r.fleet.close()
        if r.drill is not None:
            r.drill.close()
        if r.hosts is not None:
            r.hosts.down()
        history["total_s"] = round(time.monotonic() - started, 1)
    return history
