"""What the rate-limit benchmark computes from what the server saw: plain functions over timestamps.

The local server is run inside the benchmark's process with :class:`RecordingStats` in place of
its counters, so every accepted call's arrival time (``time.time()`` seconds, taken by the server
where its QPS window counts it) is known. From those: calls per second over the steady window,
the largest number of calls in any whole wall-clock second (what the server's limiter counts)
and in any sliding one-second window, and the gaps between calls (where a paced fleet lost time).
"""

from __future__ import annotations

import bisect
import itertools
import math
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ocrserver.stats import Stats

if TYPE_CHECKING:
    from ratelimit_trace import TraceStats

__all__ = [
    "CaseResult",
    "GapStats",
    "RecordingStats",
    "Spread",
    "count_in",
    "gap_stats",
    "markdown_table",
    "max_per_whole_second",
    "max_sliding",
    "spread_table",
]


class RecordingStats(Stats):
    """The server's counters plus the time of every request and every accepted call (seconds,
    the server's ``time.time()``). Appended on the server's loop thread, read with
    :meth:`snapshot` from another."""

    def reset(self) -> None:
        self._lock = threading.Lock()
        self.request_times: list[float] = []
        self.accepted_times: list[float] = []
        self.throttle_times: list[float] = []
        self.accepted_nonces: list[str | None] = []  # parallel to accepted_times, with --trace
        self.last_nonce: str | None = None
        self.random_refusals = 0  # of the throttles, refused at random (--throttle-random)
        super().reset()

    # The app counts a QPS refusal with ``stats.throttled += 1``: a property sees each one.
    @property  # type: ignore[override]
    def throttled(self) -> int:
        return self._throttled

    @throttled.setter
    def throttled(self, value: int) -> None:
        if value > getattr(self, "_throttled", 0):
            with self._lock:
                self.throttle_times.append(time.time())
        self._throttled = value

    def request(self) -> None:
        super().request()
        with self._lock:
            self.request_times.append(time.time())

    def accepted(self, key_id: str, now: float) -> None:
        super().accepted(key_id, now)
        with self._lock:
            self.accepted_times.append(now)
            self.accepted_nonces.append(self.last_nonce)

    def arrivals_by_nonce(self) -> dict[str, float]:
        """Accepted calls' arrival times by signature nonce (filled when the verifier is traced)."""
        with self._lock:
            return {n: t for n, t in zip(self.accepted_nonces, self.accepted_times, strict=True) if n}

    def snapshot(self) -> tuple[list[float], list[float], list[float]]:
        """Copies of the request, accepted and throttled times, taken together."""
        with self._lock:
            return list(self.request_times), list(self.accepted_times), list(self.throttle_times)


def count_in(times: Sequence[float], start: float, end: float) -> int:
    """Calls in ``[start, end)``; ``times`` sorted ascending."""
    return bisect.bisect_left(times, end) - bisect.bisect_left(times, start)


def max_sliding(times: Sequence[float], window_s: float = 1.0) -> int:
    """The most calls in any half-open window ``[t, t + window_s)``; ``times`` sorted ascending."""
    best = 0
    lo = 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def max_per_whole_second(times: Sequence[float]) -> int:
    """The most calls in one whole wall-clock second ``[n, n + 1)``: the window the server counts."""
    counts: dict[int, int] = {}
    for t in times:
        second = math.floor(t)
        counts[second] = counts.get(second, 0) + 1
    return max(counts.values(), default=0)


@dataclass(frozen=True, slots=True)
class GapStats:
    """Gaps between consecutive calls, seconds: median, 99th percentile and largest, and the time
    lost to gaps longer than ``slack`` intervals (``lost_s``: sum of gap - interval over those)."""

    p50_s: float
    p99_s: float
    max_s: float
    lost_s: float
    long_gaps: int


def gap_stats(times: Sequence[float], interval_s: float, slack: float = 1.5) -> GapStats:
    """Gap statistics of sorted ``times`` against the pacing ``interval_s`` (1/qps)."""
    gaps = sorted(b - a for a, b in itertools.pairwise(times))
    if not gaps:
        return GapStats(0.0, 0.0, 0.0, 0.0, 0)
    long = [g for g in gaps if g > slack * interval_s]
    return GapStats(
        p50_s=gaps[len(gaps) // 2],
        p99_s=gaps[min(len(gaps) - 1, math.ceil(0.99 * len(gaps)) - 1)],
        max_s=gaps[-1],
        lost_s=sum(g - interval_s for g in long),
        long_gaps=len(long),
    )


@dataclass(frozen=True, slots=True)
class CaseResult:
    """One benchmark case. Rates are calls per second over the steady window of ``duration_s``.
    ``throttled`` and the maxima cover the whole case, start-up included: ``max_accepted`` per
    whole second (the server's own ``max_accepted_per_second``, which its limiter caps at its
    limit), and for every call that reached the server, accepted or not, ``max_sent`` per whole
    second and ``max_sent_sliding`` in any sliding 1-s window. ``limit``: the server's real limit
    (``qps`` unless the case gives the server a lower one); ``requests``: every call that reached
    the server; ``random_refusals``: of the throttles, those the server refused at random within
    its limit; ``*_in_window``: the same counts in the steady window."""

    mode: str
    qps: int
    limit: int
    achieved_per_s: float
    sent_per_s: float
    throttled: int
    max_accepted: int
    max_sent: int
    max_sent_sliding: int
    duration_s: float
    gaps: GapStats
    throttled_at_s: tuple[float, ...] = ()  # seconds after the first accepted call
    trace: TraceStats | None = None  # with --trace
    requests: int = 0
    random_refusals: int = 0
    throttled_in_window: int = 0
    requests_in_window: int = 0

    @property
    def fraction(self) -> float:
        """Fidelity: calls accepted per second in the steady window, of the server's real limit."""
        return self.achieved_per_s / self.limit if self.limit else 0.0

    @property
    def throttled_share(self) -> float:
        """Throttled answers of all calls sent, whole case."""
        return self.throttled / self.requests if self.requests else 0.0

    @property
    def throttled_share_in_window(self) -> float:
        return self.throttled_in_window / self.requests_in_window if self.requests_in_window else 0.0


def markdown_table(results: Sequence[CaseResult]) -> str:
    """The results as one markdown table, a row per (mode, Q)."""
    head = (
        "| mode | Q | achieved calls/s | fraction of Q | throttled | max in any 1-s window: "
        "accepted whole s / sent whole s / sent sliding | duration | sent calls/s |"
    )
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in results:
        lines.append(
            f"| {r.mode} | {r.qps} | {r.achieved_per_s:.2f} | {r.fraction:.1%} | {r.throttled} "
            f"| {r.max_accepted} / {r.max_sent} / {r.max_sent_sliding} | {r.duration_s:g} s "
            f"| {r.sent_per_s:.2f} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Spread:
    """Several runs of one case, each from a fresh start, with the machine's 1-minute load
    average before and after each run."""

    label: str
    runs: Sequence[CaseResult]
    loads: Sequence[tuple[float, float]]

    @property
    def fractions(self) -> list[float]:
        return [r.fraction for r in self.runs]

    @property
    def clean_runs(self) -> int:
        """Runs without a throttle."""
        return sum(1 for r in self.runs if r.throttled == 0)


def _throttles(r: CaseResult) -> str:
    return f"{r.throttled} ({r.random_refusals} at random)" if r.random_refusals else str(r.throttled)


def spread_table(spreads: Sequence[Spread]) -> str:
    """A markdown table, a row per case: fidelity (calls accepted per second in the steady
    window, of the server's real limit) min / median / max over the runs, throttles per run,
    throttled share of all calls (whole run, and steady window), the most calls sent in one
    whole second, and the load."""
    head = (
        "| case | runs | fidelity min / median / max | throttles per run | runs without one "
        "| throttled, % of calls: whole run / steady window | most sent in a whole s | load |"
    )
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for sp in spreads:
        if not sp.runs:
            continue
        f = sp.fractions
        shares = [r.throttled_share for r in sp.runs]
        windows = [r.throttled_share_in_window for r in sp.runs]
        loads = [x for pair in sp.loads for x in pair]
        lines.append(
            f"| {sp.label} | {len(sp.runs)} | {min(f):.1%} / {statistics.median(f):.1%} / {max(f):.1%} "
            f"| {', '.join(_throttles(r) for r in sp.runs)} | {sp.clean_runs} of {len(sp.runs)} "
            f"| max {max(shares):.2%} / max {max(windows):.2%} "
            f"| {max(r.max_sent for r in sp.runs)} (limit {sp.runs[0].limit}) "
            f"| {min(loads):.2f}–{max(loads):.2f} |"
        )
    return "\n".join(lines)
