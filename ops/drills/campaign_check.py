"""The fault campaign's *checker*: a pure function over a schedule's history (what the runner did
and saw, and the final state it read), returning the figures and every invariant violated.

Invariants (issue 18, part 3):

``outcomes``
    Every image a source listed has exactly one outcome after compaction (one ``failed`` row, one
    ``no_plate`` row, or ``ok`` rows with distinct plate indexes), and nothing else is in the run.
    The runner has played the operator who follows every command's instructions, so what is left
    after its finish is a violation, whatever a command said.
``calls``
    Calls the server accepted <= distinct pictures the sources list + the documented bound: the
    calls in flight on what each fault hit (``CARNUMBER_CONCURRENCY`` per node process for a node
    killed, stopped past its lease, cut off, or SIGTERMed and then SIGKILLed; every live node's for
    a Redis stop, plus a second of calls when Redis was SIGKILLed: AOF ``everysec``).
``paid-twice``
    No picture is called twice unless a fault began while its previous call was in flight (within
    :data:`IN_FLIGHT_S` before the fault, or during it).
``verify``
    ``carnumber verify`` exits 0 exactly when ``outcomes`` holds.
``report`` / ``status``
    Their call counts are short of the server's by at most the documented margin (ops/README.md,
    "How calls are counted"): per process killed outright, its calls of the last second plus its
    calls in flight; here the fleet's calls accepted in the second before each SIGKILL, plus the
    bound above. They never count more than the server accepted.
``nodes``
    Every node is alive or exited non-zero; exit 0 only after the campaign's SIGTERM; and none
    died by itself except by a Redis outage past ``CARNUMBER_REDIS_OUTAGE_S``.
``commands``
    A command that exited 0 did what it said (issue 19): an ``enqueue`` saw every image of its
    source; nothing is called for a run between ``pause``/``cancel`` returning and its
    ``resume`` (calls in flight finish: the server may accept them up to its latency later);
    a run ``resume``d is no longer paused or cancelled a few seconds later.
``bounded``
    No command, producer or event had to be killed for running too long; the run is ``done``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

from ops.drills.campaign_gen import Schedule

__all__ = ["IN_FLIGHT_S", "Figures", "Violation", "check", "exactly_one"]

IN_FLIGHT_S = 13.0  # a call is in flight at most the read timeout (10 s) + latency + slack
_EXAMPLES = 5
_SEEN = re.compile(r"(\d+) images seen")


@dataclass(frozen=True, slots=True)
class Violation:
    invariant: str
    detail: str

    def line(self) -> str:
        return f"{self.invariant}: {self.detail}"


@dataclass
class Figures:
    images: int = 0
    missing: int = 0
    duplicated: int = 0
    unexpected: int = 0
    pictures: int = 0  # distinct pictures the sources list
    calls: int = 0  # accepted by the server
    bound: int = 0
    extra_calls: int = 0  # calls beyond one per picture called
    paid_twice: int = 0  # pictures called more than once
    verify_rc: int | None = None
    verify_agrees: bool = False
    report_calls: int | None = None
    status_calls: int | None = None
    slowest_recovery_s: float | None = None
    finish_s: float | None = None
    total_s: float | None = None
    events: dict[str, int] = field(default_factory=dict)
    node_deaths: int = 0  # nodes that exited by themselves

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def exactly_one(rows: Sequence[Sequence[Any]]) -> bool:
    """Whether an image's rows (``[status, plate_index]``) are one outcome."""
    statuses = {r[0] for r in rows}
    if len(statuses) != 1:
        return False
    if statuses == {"ok"}:
        indexes = [r[1] for r in rows]
        return len(indexes) == len(set(indexes))
    return len(rows) == 1


def _faults(ops: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
    """(start, end) of every op that may cost calls in flight."""
    return [
        (float(o["start"]), float(o.get("end") or o["start"])) for o in ops if int(o.get("bound") or 0) > 0
    ]


def _explained(t_prev: float, faults: Sequence[tuple[float, float]]) -> bool:
    return any(start - IN_FLIGHT_S <= t_prev <= end + 2.0 for start, end in faults)


def check(history: Mapping[str, Any]) -> tuple[Figures, list[Violation]]:
    """The figures and the violations of one schedule's history."""
    schedule = Schedule.from_json(history["schedule"])
    ops: list[Mapping[str, Any]] = list(history.get("ops", []))
    t0 = float(history.get("t0", 0.0))
    fig = Figures(events=dict(Counter(e.kind for e in schedule.events)))
    fig.finish_s, fig.total_s = history.get("finish_s"), history.get("total_s")
    out: list[Violation] = [Violation("runner", e) for e in history.get("errors", [])]
    if "listing" not in history or "outcomes" not in history:
        out.append(Violation("runner", "no final state recorded"))
        return fig, out

    # outcomes
    listed: dict[str, str] = {}
    for source in history["listing"]:
        listed.update(source["images"])
    outcomes: Mapping[str, Sequence[Sequence[Any]]] = history["outcomes"]
    missing = sorted(set(listed) - set(outcomes))
    unexpected = sorted(set(outcomes) - set(listed))
    duplicated = sorted(i for i, rows in outcomes.items() if not exactly_one(rows))
    fig.images, fig.missing, fig.duplicated, fig.unexpected = (
        len(listed),
        len(missing),
        len(duplicated),
        len(unexpected),
    )
    holds = not (missing or duplicated or unexpected)
    for name, ids in (("missing", missing), ("duplicated", duplicated), ("unexpected", unexpected)):
        if ids:
            out.append(Violation("outcomes", f"{len(ids)} images {name} after the operator's finish, e.g. "
                                 + ", ".join(ids[:_EXAMPLES])))  # fmt: skip

    # calls and pictures paid twice
    faults = _faults(ops)
    fig.bound = sum(int(o.get("bound") or 0) for o in ops)
    server = history["server"]
    pictures: Mapping[str, Sequence[float]] = server["pictures"]
    wanted = {h for h in listed.values() if h}
    unhashed = sum(1 for h in listed.values() if not h)  # archive members, links: each at most one picture
    fig.pictures, fig.calls = len(wanted) + unhashed, int(server["accepted_total"])
    fig.extra_calls = fig.calls - len(pictures)
    fig.paid_twice = sum(1 for t in pictures.values() if len(t) > 1)
    if fig.calls > fig.pictures + fig.bound:
        over = fig.calls - fig.pictures - fig.bound
        out.append(Violation("calls", f"{fig.calls} calls accepted for {fig.pictures} pictures, bound "
                             f"{fig.bound} (the calls in flight at each fault): {over} over"))  # fmt: skip
    strangers = sorted(set(pictures) - wanted)
    if len(strangers) > unhashed:
        out.append(Violation("calls", f"{len(strangers)} pictures called that no source lists"))
    unexplained = []
    for digest, times in pictures.items():
        ts = sorted(times)
        for prev, again in pairwise(ts):
            if not _explained(prev, faults):
                unexplained.append(f"{digest[:10]} at t+{prev - t0:.1f}s and t+{again - t0:.1f}s")
    if unexplained:
        examples = "; ".join(unexplained[:_EXAMPLES])
        out.append(Violation("paid-twice", f"{len(unexplained)} calls for pictures already called, with no "
                             f"fault while the first was in flight, e.g. {examples}"))  # fmt: skip

    # verify, report, status
    verify = history.get("verify", {})
    fig.verify_rc = verify.get("rc")
    fig.verify_agrees = (fig.verify_rc == 0) == holds
    if not fig.verify_agrees:
        said = verify.get("json", {}).get("reasons") or "OK"
        out.append(Violation("verify", f"verify exited {fig.verify_rc} ({said}) but the outcomes invariant "
                             f"{'holds' if holds else 'does not hold'}"))  # fmt: skip
    margin = fig.bound + _last_second_of_kills(ops, pictures)
    for name in ("report", "status"):
        got = history.get(name, {}).get("calls")
        calls = int(float(got)) if got is not None else None
        setattr(fig, f"{name}_calls", calls)
        if calls is None:
            out.append(
                Violation(
                    name, f"`carnumber {name}` gave no call count (rc {history.get(name, {}).get('rc')})"
                )
            )
        elif not fig.calls - margin <= calls <= fig.calls:
            out.append(
                Violation(name, f"says {calls} calls, the server accepted {fig.calls} (margin {margin})")
            )
    state = history.get("status", {}).get("state")
    if state != "done":
        out.append(Violation("bounded", f"the run is {state!r} after the operator's finish, not done"))

    # nodes
    pasts = [(float(o["start"]), float(o.get("end") or o["start"])) for o in ops if o["kind"] == "redis-past"]
    for node in history.get("nodes", []):
        signals, rc = node.get("signals", []), node.get("rc")
        if node.get("alive") or rc is None:
            continue
        if rc == 0 and "SIGTERM" not in signals:
            out.append(Violation("nodes", f"{node['name']} exited 0 unasked:\n{node.get('tail', '')}"))
        elif not signals:
            fig.node_deaths += 1
            exited = float(node.get("exited") or 0.0)
            if not any(start <= exited <= end + 60.0 for start, end in pasts):
                when = f"t+{exited - t0:.1f}s"
                out.append(Violation("nodes", f"{node['name']} died by itself (rc {rc}) at {when}:\n"
                                     + node.get("tail", "")))  # fmt: skip

    out += _commands(ops, history["listing"], pictures, schedule, t0)

    # bounded
    for o in ops:
        if o["what"].startswith("runner error"):
            out.append(Violation("runner", f"{o['kind']}: {o['what']}"))
        if o.get("timed_out"):
            out.append(Violation("bounded", f"{o['kind']}: `{o['what']}` ran too long and was killed"))
        elif o["what"].startswith("event still running"):
            out.append(Violation("bounded", f"event {o['kind']} still running after the schedule"))
    recoveries = [float(o["recovery_s"]) for o in ops if o.get("recovery_s") is not None]
    fig.slowest_recovery_s = max(recoveries) if recoveries else None
    return fig, out


def _last_second_of_kills(ops: Sequence[Mapping[str, Any]], pictures: Mapping[str, Sequence[float]]) -> int:
    """Calls accepted in the second before each SIGKILL of nodes (a killed process's unflushed
    counts are at most its calls of the last second; the fleet's are an upper bound of those)."""
    calls = sorted(t for times in pictures.values() for t in times)
    kills = [float(o["start"]) for o in ops if o["kind"] == "kill" or "SIGKILLed" in str(o.get("note"))]
    return sum(sum(1 for t in calls if k - 1.0 <= t <= k) for k in kills)


def _commands(
    ops: Sequence[Mapping[str, Any]],
    listing: Sequence[Mapping[str, Any]],
    pictures: Mapping[str, Sequence[float]],
    schedule: Schedule,
    t0: float,
) -> list[Violation]:
    out: list[Violation] = []
    sizes = {str(src["source"]): len(src["images"]) for src in listing}
    for o in ops:
        if o["what"].startswith("carnumber enqueue ") and o.get("rc") == 0:
            source = o["what"].split()[2]
            seen = _SEEN.search(o.get("out") or "")
            if seen and source in sizes and int(seen.group(1)) < sizes[source]:
                out.append(Violation("commands", f"`{o['what']}` exited 0 having seen {seen.group(1)} of the "
                                     f"{sizes[source]} images of its source"))  # fmt: skip
    resumes = sorted((float(o["start"]), o) for o in ops if o["what"].startswith("carnumber resume"))
    holds = [
        o for o in ops if o["what"].startswith(("carnumber pause ", "carnumber cancel ")) and o.get("rc") == 0
    ]
    calls = sorted(t for times in pictures.values() for t in times)
    slack = schedule.params.latency_ms / 1000.0 + 0.5
    for hold in holds:
        since = float(hold.get("end") or hold["start"]) + slack
        until = next((start for start, _ in resumes if start > since), float("inf"))
        made = [t for t in calls if since < t < until]
        if made:
            held = f"`{hold['what']}` returned at t+{since - slack - t0:.1f}s"
            out.append(Violation("commands", f"{len(made)} calls accepted while the run was held: {held}, "
                                 f"first call at t+{made[0] - t0:.1f}s"))  # fmt: skip
    for start, o in resumes:
        note = str(o.get("note") or "")
        if o.get("rc") != 0 or not note.endswith((": paused", ": cancelled")):
            continue
        again = [h for h in holds if start < float(h["start"]) < float(o.get("end") or start) + 10]
        if not again:
            out.append(Violation("commands", f"`{o['what']}` exited 0 at t+{start - t0:.1f}s; {note}"))
    return out
