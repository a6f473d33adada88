"""Reading the ``--trace`` records (``ratelimit_probe``) and saying where the time went.

Per admitted call: ``slot`` (the time the global limiter granted, Redis ``TIME``), ``woke`` (when
the caller's sleep ended), ``signed`` (request built) and, matched by nonce, ``arrived`` (when the
server counted it). From those: whether the *schedule* kept the limit (slot spacing, slots in any
1-s window), how much schedule time nobody used (idle), and how late calls reach the server after
their slot (delivery): the spread of that delay is what can push one more call into a whole
second than the schedule put there.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ratelimit_measure import max_sliding

__all__ = ["CROWDING_GUARDS_MS", "TraceStats", "crowding_per_min", "percentile", "read_trace", "trace_stats"]

CROWDING_GUARDS_MS = (5.0, 10.0, 15.0, 20.0)


def read_trace(trace_dir: Path, arrivals: Mapping[str, float], first: float) -> list[dict[str, Any]]:
    """All records of ``trace_dir`` with ``arrived`` (Unix s, or None) added, sorted by slot;
    records whose slot is before ``first - 5`` s (another case) are dropped."""
    records: list[dict[str, Any]] = []
    for path in sorted(trace_dir.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if math.isnan(rec["slot"]) or rec["slot"] < first - 5:
                continue
            rec["arrived"] = arrivals.get(rec.get("nonce") or "")
            records.append(rec)
    records.sort(key=lambda r: r["slot"])
    return records


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(frozen=True, slots=True)
class TraceStats:
    """Milliseconds unless named otherwise. ``slots_max_1s``: most slots in any sliding 1-s window
    of the schedule (the slots used: one whose request missed its ``send_by`` went back or was
    lost); ``slot_gap_min_ms``: closest two used slots; ``idle_s``: schedule time in the
    steady window that no caller had booked (sum of slot gaps beyond one interval); ``wake_*``:
    sleep overshoot (woke - slot); ``delivery_*``: arrived - slot, steady window; ``startup_*``:
    the same before it; ``spread_ms``: delivery max - min in the steady window; ``admit_*``:
    arrived - woke (what delivery takes after ``acquire`` returned, which the send deadline
    bounds); ``rebooked``: slots callers woke too late for and did not
    use (the limiter's late re-book); ``returned``: of those, slots given back (not wasted);
    ``missed``: admitted requests held up past their slot's ``send_by`` and not sent (left out of
    everything else: their slots count as unused); ``crowding``: see the field."""

    calls: int
    slots_max_1s: int
    slot_gap_min_ms: float
    idle_s: float
    wake_p50_ms: float
    wake_p99_ms: float
    wake_max_ms: float
    delivery_p50_ms: float
    delivery_p99_ms: float
    delivery_max_ms: float
    spread_ms: float
    startup_delivery_max_ms: float
    missed: int = 0  # admitted requests not sent: held up past the slot's send_by
    rebooked: int = 0  # slots not used by callers that woke too late (late re-book)
    returned: int = 0  # of those, slots given back because nobody had booked after them
    admit_p50_ms: float = float("nan")
    admit_p99_ms: float = float("nan")
    admit_max_ms: float = float("nan")
    # (guard ms, calls past Q in a whole second per minute) on this run's delays: what a pacing
    # guard of that size would have let through (:func:`crowding_per_min`), steady window
    crowding: tuple[tuple[float, float], ...] = ()


def trace_stats(
    records: Sequence[Mapping[str, Any]], start: float, end: float, interval_s: float
) -> TraceStats:
    """Statistics of ``records`` (sorted by slot); the steady window is ``[start, end)`` and the
    limiter's pacing ``interval_s`` (1/qps)."""
    missed = sum(1 for r in records if r.get("missed"))
    # A missed slot's request never left, and the slot went back to the schedule (or was lost):
    # the schedule the service saw is the slots that were used.
    records = [r for r in records if not r.get("missed")]
    slots = [r["slot"] for r in records]
    steady = [r for r in records if start <= r["slot"] < end]
    early = [r for r in records if r["slot"] < start]
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    steady_slots = [r["slot"] for r in steady]
    idle = sum(
        max(0.0, (b - a) - interval_s)
        for a, b in itertools.pairwise(steady_slots)
    )
    wake = [1000 * (r["woke"] - r["slot"]) for r in steady]
    delivery = [1000 * (r["arrived"] - r["slot"]) for r in steady if r["arrived"] is not None]
    admit = [1000 * (r["arrived"] - r["woke"]) for r in steady if r["arrived"] is not None]
    early_delivery = [1000 * (r["arrived"] - r["slot"]) for r in early if r["arrived"] is not None]
    return TraceStats(
        calls=len(records),
        slots_max_1s=max_sliding(slots),
        slot_gap_min_ms=1000 * min(gaps, default=float("nan")),
        idle_s=idle,
        wake_p50_ms=percentile(wake, 0.5),
        wake_p99_ms=percentile(wake, 0.99),
        wake_max_ms=max(wake, default=float("nan")),
        delivery_p50_ms=percentile(delivery, 0.5),
        delivery_p99_ms=percentile(delivery, 0.99),
        delivery_max_ms=max(delivery, default=float("nan")),
        spread_ms=(max(delivery) - min(delivery)) if delivery else float("nan"),
        startup_delivery_max_ms=max(early_delivery, default=float("nan")),
        missed=missed,
        rebooked=sum(int(r.get("rebooked", 0)) for r in records),
        returned=sum(int(r.get("returned", 0)) for r in records),
        admit_p50_ms=percentile(admit, 0.5),
        admit_p99_ms=percentile(admit, 0.99),
        admit_max_ms=max(admit, default=float("nan")),
        crowding=tuple((g, crowding_per_min(steady, 1 / interval_s, g / 1000)) for g in CROWDING_GUARDS_MS),
    )


def crowding_per_min(
    records: Sequence[Mapping[str, Any]], qps: float, guard_s: float, phases: int = 40
) -> float:
    """Calls past ``qps`` in a whole second, per minute, had these calls been paced with
    ``guard_s`` and delivered with the delays they had (``arrived - slot``, in slot order): the
    throttles a pacing guard would have let through, on this run's lateness. Averaged over
    ``phases`` evenly spread positions of the second boundaries. Records without an arrival, and
    missed ones, are left out."""
    delays = [r["arrived"] - r["slot"] for r in records if r.get("arrived") and not r.get("missed")]
    if not delays:
        return 0.0
    spacing = (1 + guard_s) / qps
    excess = 0
    for p in range(phases):
        counts: dict[int, int] = {}
        for k, d in enumerate(delays):
            second = math.floor(p / phases + k * spacing + d)
            counts[second] = counts.get(second, 0) + 1
        excess += sum(max(0, n - math.floor(qps)) for n in counts.values())
    return excess / phases / (len(delays) * spacing) * 60
