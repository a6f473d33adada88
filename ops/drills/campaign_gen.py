"""The fault campaign's *generator*: a pure function from a seed to a schedule.

A :class:`Schedule` is everything a run of the campaign does, fixed before anything starts: the
fleet (nodes at the start, nodes on test hosts of their own, a supervisor or none), the quota, the
second source, and the timed :class:`Event` list, each ``at_s`` seconds after the producer starts.
The same seed and :class:`Params` give the same schedule on any machine (``random.Random(seed)``
and nothing else); what the fleet does in reply is timing, not the seed, so a failing seed is
played again to see it again, not replayed instruction by instruction (as in Jepsen, unlike
FoundationDB's deterministic simulation).

Which node an event hits is fixed as a fraction (``pick``) of the nodes alive at that moment, in
the order they started, so a schedule names no node it cannot know in advance; a named scenario
may name a node (``node``). Some faults wait for the run's *tail* (``when: tail``): the first
moment after ``at_s`` when no producer runs, the broker queue is empty and no more chunks are
held than there are live nodes: the nodes finish their last chunks, most holding one message or
none (where issue 18's nodes died); then ``after_s`` more.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

__all__ = [
    "EVENT_KINDS",
    "FAULTS",
    "FULL",
    "SMALL",
    "Event",
    "Params",
    "Schedule",
    "generate",
    "nodes_replaced_then_redis_restart",
]

# What the generator can play. Node faults, Redis faults, the producer, operator commands.
EVENT_KINDS = (
    "kill",  # SIGKILL of one or several whole nodes (process groups), maybe replaced
    "join",  # a new node joins
    "term",  # SIGTERM of a node (a rolling restart: a fresh node takes its place)
    "stop",  # SIGSTOP of a node for longer than a lease, then SIGCONT
    "cut",  # a node on a test host of its own cut off from Redis for longer than a lease (root)
    "redis-blip",  # Redis stopped for 1-5 s
    "redis-long",  # Redis stopped for 30-90 s
    "redis-past",  # Redis stopped past CARNUMBER_REDIS_OUTAGE_S (nodes exit; a supervisor restarts them)
    "producer-kill",  # the running `carnumber enqueue` SIGKILLed, the same command run again
    "second-source",  # a second source enqueued into the same run (copies and new pictures)
    "pause",  # `carnumber pause`, then `resume`
    "cancel",  # `carnumber cancel`, then `resume --force`
    "verify-republish",  # `carnumber verify --republish` on the live run
    "retry-failures",
    "compact",
    "status",
    "report",
    "quota-raise",  # the quota ran out mid-run: raised, workers restarted, resume, enqueue again
)

# Faults that may cost the calls in flight (the documented bound); the rest must cost nothing.
FAULTS = ("kill", "term", "stop", "cut", "redis-blip", "redis-long", "redis-past")

_WEIGHTS: Mapping[str, float] = {
    "kill": 3, "join": 2, "term": 2, "stop": 2, "cut": 1.5, "redis-blip": 2, "redis-long": 1,
    "redis-past": 0.4, "producer-kill": 1.5, "second-source": 1, "pause": 1.5, "cancel": 1,
    "verify-republish": 1, "retry-failures": 1, "compact": 1, "status": 1, "report": 1, "quota-raise": 0.8,
}  # fmt: skip
_ONCE = ("redis-past", "second-source", "quota-raise")  # at most one per schedule
_TAIL = ("kill", "term", "stop", "cut", "redis-blip", "redis-long", "pause", "cancel", "verify-republish")
TAIL_SHARE = 0.3  # of those, played at the run's tail
_REDIS = ("redis-blip", "redis-long", "redis-past")


@dataclass(frozen=True, slots=True)
class Params:
    """The size of a schedule and of its fleet. ``FULL`` is the script's default, ``SMALL`` the
    test suite's; every field is a flag of ``ops/drills/campaign.py``."""

    images: int = 2000
    chunk_size: int = 50
    lease_s: float = 20.0  # CARNUMBER_LEASE_S
    qps: float = 20.0  # CARNUMBER_QPS (0: unlimited)
    latency_ms: int = 30  # the local server's added latency per call
    concurrency: int = 8  # CARNUMBER_CONCURRENCY: calls in flight per node process
    processes: int = 2  # `carnumber worker -c`: chunks at once (threads pool)
    nodes_min: int = 2
    nodes_max: int = 4
    high_water: int = 6  # CARNUMBER_QUEUE_HIGH_WATER: the producer runs for most of the run
    redis_outage_s: float = 100.0  # CARNUMBER_REDIS_OUTAGE_S
    blip_s: tuple[float, float] = (1.0, 5.0)
    long_s: tuple[float, float] = (30.0, 90.0)
    past_s: tuple[float, float] = (5.0, 15.0)  # beyond redis_outage_s
    events_min: int = 5
    events_max: int = 10
    root: bool = False  # network namespaces allowed: `cut` events
    bad_inputs: bool = True
    finish_s: float = 900.0  # the operator's bound for finishing the run after the schedule

    def horizon_s(self) -> float:
        """Seconds the run takes at full rate: events fall within it."""
        rate = self.qps if self.qps > 0 else 150.0
        return max(10.0, self.images / rate)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Params:
        known = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known}
        return cls(**values)


FULL = Params()
SMALL = Params(
    images=300, chunk_size=25, lease_s=10.0, qps=25.0, concurrency=4, nodes_min=2, nodes_max=3,
    high_water=4, redis_outage_s=20.0, blip_s=(1.0, 3.0), long_s=(6.0, 10.0), past_s=(3.0, 6.0),
    events_min=3, events_max=5, finish_s=150.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Event:
    at_s: float
    kind: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"at_s": self.at_s, "kind": self.kind, "args": dict(self.args)}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Event:
        return cls(float(raw["at_s"]), str(raw["kind"]), dict(raw.get("args", {})))

    def line(self) -> str:
        args = " ".join(f"{k}={_short(v)}" for k, v in self.args.items())
        return f"t+{self.at_s:6.1f}s {self.kind} {args}".rstrip()


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, list):
        return "[" + ",".join(_short(x) for x in v) + "]"
    return str(v)


@dataclass(frozen=True, slots=True)
class Schedule:
    name: str  # "seed N" or a scenario's name
    seed: int | None
    params: Params
    nodes: int  # at the start
    ns_nodes: int = 0  # of which on a test host of their own (network namespace), for `cut`
    supervisor: bool = True  # a node that exits by itself is started again 2 s later
    operator_starts_nodes: bool = True  # when no node is left, the operator's finish starts some
    quota: int | None = None  # CARNUMBER_QUOTA (window total) at the start; quota-raise lifts it
    second_copies: int = 0  # the second source: byte-identical copies of archive pictures
    second_new: int = 0  # ... and pictures of its own
    events: tuple[Event, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "seed": self.seed, "params": self.params.to_json(), "nodes": self.nodes,
            "ns_nodes": self.ns_nodes, "supervisor": self.supervisor,
            "operator_starts_nodes": self.operator_starts_nodes, "quota": self.quota,
            "second_copies": self.second_copies, "second_new": self.second_new,
            "events": [e.to_json() for e in self.events],
        }  # fmt: skip

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Schedule:
        return cls(
            name=str(raw["name"]), seed=raw.get("seed"), params=Params.from_json(raw["params"]),
            nodes=int(raw["nodes"]), ns_nodes=int(raw.get("ns_nodes", 0)),
            supervisor=bool(raw.get("supervisor", True)),
            operator_starts_nodes=bool(raw.get("operator_starts_nodes", True)), quota=raw.get("quota"),
            second_copies=int(raw.get("second_copies", 0)), second_new=int(raw.get("second_new", 0)),
            events=tuple(Event.from_json(e) for e in raw.get("events", ())),
        )  # fmt: skip

    def describe(self) -> str:
        head = (
            f"{self.name}: {self.params.images} images, {self.nodes} nodes"
            + (f" ({self.ns_nodes} on a test host)" if self.ns_nodes else "")
            + f", {'a' if self.supervisor else 'no'} supervisor, lease {self.params.lease_s:g} s, "
            f"QPS {self.params.qps:g}" + (f", quota {self.quota}" if self.quota is not None else "")
        )
        return "\n".join([head, *("  " + e.line() for e in self.events)])


def _pick(rng: random.Random, n: int) -> list[float]:
    return [round(rng.random(), 4) for _ in range(n)]


def _event(rng: random.Random, kind: str, p: Params, horizon: float) -> Event:
    """One event of ``kind`` at a random moment of the run, with its random arguments."""
    at = rng.uniform(0.02, 1.05) * horizon
    lease = p.lease_s
    args: dict[str, Any] = {}
    if kind == "kill":
        n = rng.choices([1, 2, 0], weights=[6, 3, 1])[0]  # 0: every node at once, then a fresh fleet
        args = {"victims": n or "all", "replace": n == 0 or rng.random() < 0.5, "pick": _pick(rng, max(n, 1))}
    elif kind == "join":
        args = {"nodes": rng.choice([1, 1, 2])}
    elif kind == "term":
        args = {"pick": _pick(rng, 1), "replace": rng.random() < 0.8}
    elif kind in ("stop", "cut"):
        args = {"pick": _pick(rng, 1), "for_s": round(rng.uniform(1.2, 2.5) * lease, 1)}
    elif kind in _REDIS:
        lo, hi = {"redis-blip": p.blip_s, "redis-long": p.long_s, "redis-past": p.past_s}[kind]
        down = rng.uniform(lo, hi) + (p.redis_outage_s if kind == "redis-past" else 0.0)
        args = {"down_s": round(down, 1), "signal": "KILL" if rng.random() < 0.2 else "TERM"}
    elif kind == "producer-kill":
        at = rng.uniform(0.03, 0.6) * horizon  # while it still publishes (the queue's high water)
        args = {"again_after_s": round(rng.uniform(0.0, 3.0), 1)}
    elif kind == "second-source":
        at = rng.uniform(0.0, 0.8) * horizon
    elif kind in ("pause", "cancel"):
        args = {"resume_after_s": round(rng.uniform(2.0, max(3.0, 0.3 * horizon)), 1)}
    elif kind == "quota-raise":
        args = {
            "fraction": round(rng.uniform(0.2, 0.6), 2),
            "raise_after_s": round(rng.uniform(5.0, 0.3 * horizon + 5), 1),
        }
    return Event(round(at, 1), kind, args)


def _separate_redis(events: list[Event]) -> list[Event]:
    """Redis events never overlap: a later one moves to 3 s after the earlier one is back."""
    out: list[Event] = []
    free_at = 0.0
    for e in sorted(events, key=lambda e: e.at_s):
        if e.kind in _REDIS:
            if e.at_s < free_at:
                e = replace(e, at_s=round(free_at, 1))
            free_at = e.at_s + float(e.args["down_s"]) + 3.0
        out.append(e)
    return sorted(out, key=lambda e: e.at_s)


def generate(seed: int, params: Params = FULL) -> Schedule:
    """The schedule of ``seed`` at ``params``: a pure function of both."""
    rng = random.Random(seed)
    horizon = params.horizon_s()
    kinds = list(EVENT_KINDS)  # the same draws with or without root: only `cut` differs
    weights = [_WEIGHTS[k] for k in kinds]
    tail_rng = random.Random(f"tail-{seed}")  # a stream of its own: the other draws stay as they were
    events: list[Event] = []
    for _ in range(rng.randint(params.events_min, params.events_max)):
        kind = rng.choices(kinds, weights=weights)[0]
        if kind in _ONCE and any(e.kind == kind for e in events):
            kind = "status"
        event = _event(rng, kind, params, horizon)
        if kind in _TAIL and tail_rng.random() < TAIL_SHARE:
            tail = {**event.args, "when": "tail", "after_s": round(tail_rng.uniform(0.0, 4.0), 1)}
            event = Event(round(min(event.at_s, 0.3 * horizon), 1), kind, tail)
        if kind == "cut" and not params.root:  # no namespaces: the nearest fault without them
            event = Event(event.at_s, "stop", event.args)
        events.append(event)
    nodes = rng.randint(params.nodes_min, params.nodes_max)
    ns_nodes = 1 if any(e.kind == "cut" for e in events) else 0
    quota = None
    for e in list(events):
        if e.kind == "quota-raise":
            # The quota runs out at about fraction x horizon; raised some seconds later.
            quota = max(1, int(params.images * float(e.args["fraction"])))
            events.remove(e)
            at = round(float(e.args["fraction"]) * horizon + float(e.args["raise_after_s"]), 1)
            events.append(Event(at, "quota-raise", {}))
    copies = new = 0
    if any(e.kind == "second-source" for e in events):
        copies, new = max(1, params.images // 10), max(1, params.images // 20)
    return Schedule(
        name=f"seed {seed}",
        seed=seed,
        params=params,
        nodes=nodes,
        ns_nodes=ns_nodes,
        supervisor=rng.random() < 0.5,
        quota=quota,
        second_copies=copies,
        second_new=new,
        events=tuple(_separate_redis(events)),
    )


def nodes_replaced_then_redis_restart(params: Params | None = None) -> Schedule:
    """Issue 18's scenario as it was played: 3,000 images on three nodes (default pool, AOF Redis,
    the server at 30 ms); each original node SIGKILLed in turn 8 s apart and replaced by a fresh
    node; 5 s after the third replacement Redis stopped (SIGTERM) and started 3 s later. QPS 70
    paces the run so that the Redis stop falls at its tail, the replacements finishing their last
    chunks while the dead nodes' chunks wait for their leases: with no limit the live work was over
    by then, with 50 the queue still held chunks; at 70 the code before the fix (61af5e2) lost a
    replacement node (exit 0 after `Unrecoverable error: AttributeError ... 'hostname'`).
    No supervisor, and no operator starting nodes: every image must still finish (the issue saw
    1,200 of 3,000 still queued ten minutes later)."""
    p = params or Params(
        images=3000, chunk_size=200, lease_s=45.0, qps=70.0, concurrency=16, high_water=20,
        redis_outage_s=300.0, bad_inputs=False, finish_s=300.0,
    )  # fmt: skip
    kills: Sequence[Event] = [
        Event(4.0 + 8.0 * i, "kill", {"node": f"node{i + 1}", "victims": 1, "replace": True})
        for i in range(3)
    ]
    redis = Event(kills[-1].at_s + 5.0, "redis-blip", {"down_s": 3.0, "signal": "TERM"})
    return Schedule(
        name="nodes-replaced-then-redis-restart", seed=None, params=p, nodes=3, supervisor=False,
        operator_starts_nodes=False, events=(*kills, redis),
    )  # fmt: skip
