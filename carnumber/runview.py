"""The figures ``carnumber status RUN`` shows, gathered from Redis (and Celery) as plain data.

:class:`RunView` reads, and never writes: the run hash (:class:`~workers.books.runs.RunStore`), the
fleet's switches, quota and call counters through :class:`~carnumber.monitor.Monitor`, the
per-minute call counters of :mod:`workers.metrics`, and optionally which worker nodes answer a
Celery broadcast. :class:`Sampler` keeps the last minutes of readings of one watcher, for the
rates a single reading cannot give (calls in the last 10 s, images per second now).

Rates and estimates, and what they rest on:

* calls per second, last minute: the per-minute counters of the current and the previous UTC
  minute, the previous one weighted by the part of it inside the last 60 s (or the run's age,
  when the run is younger); last 10 s: the
  difference of the all-time counter over the watcher's own readings (``None`` on a single
  reading). Counters are account-wide: every run of the account shares the limit.
* estimated finish: images outstanding / images per second, where images per second is the
  watcher's own last minute of readings when it has 10 s of them, else calls per second over the
  run's calls per image, else the run's average since it was created (``eta_basis`` says which).
* cost: calls × ``CARNUMBER_PRICE_PER_1000_CALLS`` / 1000; projected adds the outstanding images
  at the run's calls per image.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from carnumber.monitor import AccountSnapshot, Monitor, Snapshot
from workers.books.runs import RunSummary
from workers.config import Settings
from workers.errors import ConfigError
from workers.keys import Keys
from workers.metrics import CallStats, read_call_stats, read_in_flight

__all__ = [
    "ENDED_STATES",
    "PAUSED_STATES",
    "RunFigures",
    "RunView",
    "Sampler",
    "WorkerInfo",
    "celery_workers",
    "parse_deadline",
]

# States in which a run makes no more calls until an operator (or the nightly job) acts.
PAUSED_STATES = (
    "stopped", "quota_exhausted", "circuit_open", "redis_unavailable", "shutdown", "paused", "cancelled",
)  # fmt: skip
# ... or until the operator finishes enqueuing a source ("incomplete": every image enqueued so far
# has its outcome, but a source's enqueue stopped early or its producer died).
ENDED_STATES = ("done", "incomplete", *PAUSED_STATES)
_HHMM = re.compile(r"(\d{1,2}):(\d{2})")
_IMAGES = re.compile(r"\bimages=(\d+)")


def parse_deadline(text: str, created_at_s: float) -> float:
    """A deadline as Unix seconds: epoch seconds, an ISO date-time (UTC unless it names a zone),
    or ``HH:MM`` (UTC), the first such time after ``created_at_s``. Raises ConfigError."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    m = _HHMM.fullmatch(text)
    if m:
        created = dt.datetime.fromtimestamp(created_at_s, dt.UTC)
        at = created.replace(hour=int(m.group(1)), minute=int(m.group(2)), second=0, microsecond=0)
        if at <= created:
            at += dt.timedelta(days=1)
        return at.timestamp()
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"deadline {text!r}: give an ISO date-time (2026-11-24T06:00Z) or HH:MM (UTC)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """Nodes that answered a Celery broadcast, and the chunks they run now (``None``: not asked
    or no answer could be had)."""

    nodes: tuple[str, ...] = ()
    chunks_running: int = 0
    images_running: int = 0


def celery_workers(run_id: str | None, timeout_s: float = 0.5) -> WorkerInfo | None:
    """Ask every worker node (``inspect active``, ``timeout_s`` seconds) which chunks it runs;
    counts only ``run_id``'s chunks when given. ``None`` when the broker cannot be asked.
    Needs :func:`carnumber.commands.common.configure_celery` first."""
    from workers.celery import app

    try:
        # safe: the workers answer with each task's short argsrepr, never the chunk's sources
        replies = app.control.inspect(timeout=timeout_s).active(safe=True) or {}
    except (OSError, redis.RedisError, ConnectionError):
        return None
    chunks = images = 0
    for tasks in replies.values():
        for task in tasks or []:
            args = str(task.get("args", ""))
            if run_id is not None and f"run={run_id} " not in f"{args} ":
                continue
            chunks += 1
            m = _IMAGES.search(args)
            images += int(m.group(1)) if m else 0
    return WorkerInfo(tuple(sorted(replies)), chunks, images)


@dataclass(slots=True)
class Sampler:
    """Readings of one watcher: ``(monotonic s, all-time calls, images written)``, the last
    ``keep_s`` seconds of them."""

    keep_s: float = 120.0
    points: deque[tuple[float, int, int]] = field(default_factory=deque)

    def add(self, at_s: float, calls: int, written: int) -> None:
        self.points.append((at_s, calls, written))
        while self.points and at_s - self.points[0][0] > self.keep_s:
            self.points.popleft()

    def rate(self, window_s: float, index: int, min_span_s: float) -> float | None:
        """Per-second growth of value ``index`` (1: calls, 2: images) over about the last
        ``window_s``; ``None`` when the readings span less than ``min_span_s``."""
        if not self.points:
            return None
        last = self.points[-1]
        # The newest reading at least window_s old (else the oldest): spans about window_s.
        older = [p for p in self.points if last[0] - p[0] >= window_s]
        first = older[-1] if older else self.points[0]
        span = last[0] - first[0]
        if span < min_span_s:
            return None
        return max(0, last[index] - first[index]) / span


@dataclass(frozen=True, slots=True)
class RunFigures:
    """Everything the status screen shows for one run. Times are Unix seconds; rates per second;
    ``None`` where a figure is not known (no quota, no price, a single reading, ...)."""

    run_id: str
    state: str
    fleet: str  # running, enqueuing, done, paused, cancelled, quota_exhausted, circuit_open, stopped (CODE)
    source: str
    created_at_s: float
    age_s: float
    enqueued: int
    written: int
    failed: int
    parked: int
    pending: int
    skipped: int
    plates: int
    calls: int
    stop_code: str | None
    stop_message: str | None
    # Sources whose enqueue stopped early or whose producer died: (source, images published,
    # why, the command that finishes it).
    unfinished: tuple[tuple[str, int, str, str], ...]
    circuit: str
    qps_limit: float
    calls_per_s_10s: float | None
    calls_per_s_1m: float
    throttled_1m: int
    quota_limit: int | None
    quota_used: int | None
    quota_left: int | None
    quota_window: str | None
    quota_resets_at_s: float | None
    images_per_s: float | None
    eta_basis: str | None  # watch, calls, average
    eta_s: float | None
    finish_at_s: float | None
    deadline_at_s: float | None
    on_time: bool | None
    queue_depth: int
    chunks_unacked: int
    workers: tuple[str, ...] | None
    chunks_running: int | None
    images_running: int | None
    calls_in_flight: int | None  # over every worker process of the account that reports
    price_per_1000_calls: float | None
    cost: float | None
    cost_projected: float | None
    at_s: float

    @property
    def progress(self) -> float:
        """Images with an outcome / images enqueued, 0..1."""
        return self.written / self.enqueued if self.enqueued else 0.0

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES and (self.state != "done" or self.pending == 0)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["progress"] = round(self.progress, 6)
        return data


def _float(fields: Mapping[str, str], name: str) -> float | None:
    try:
        return float(fields[name]) if fields.get(name) else None
    except ValueError:
        return None


def _int(fields: Mapping[str, str], name: str) -> int:
    try:
        return int(float(fields.get(name, 0) or 0))
    except ValueError:
        return 0


def _throttled(stats: CallStats) -> int:
    return sum(n for code, n in stats.by_code.items() if code.lower().startswith("throttling"))


class RunView:
    """Reads :class:`RunFigures` for runs of the deployment ``settings`` names. ``workers``: a
    function of the run id returning :class:`WorkerInfo` (``None`` to leave it unknown);
    ``clock``: Unix seconds; ``monotonic``: seconds for the sampler (both injectable)."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        monitor: Monitor,
        *,
        workers: Callable[[str], WorkerInfo | None] | None = None,
        workers_every_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.r = client
        self.monitor = monitor
        self.keys = Keys(settings.key_prefix)
        self.workers = workers
        self.workers_every_s = workers_every_s
        self.clock = clock
        self.monotonic = monotonic
        self.samplers: dict[str, Sampler] = {}
        self._workers_cache: dict[str, tuple[float, WorkerInfo | None]] = {}

    def snapshot(self) -> Snapshot:
        return self.monitor.snapshot()

    def figures(self, run: RunSummary, snap: Snapshot | None = None) -> RunFigures:
        """The figures of ``run`` now. Raises RedisError when Redis cannot be read."""
        snap = snap if snap is not None else self.snapshot()
        if not snap.redis_up:
            raise redis.ConnectionError(f"Redis not readable ({snap.error})")
        now = self.clock()
        f = run.fields
        accounts = self._accounts(snap)
        total_calls = sum(a.calls.calls for a in accounts)
        created = _float(f, "created_at") or now
        cps_1m, throttled = self._last_minute(accounts, now, span_s=min(60.0, max(1.0, now - created)))
        sampler = self.samplers.setdefault(run.run_id, Sampler())
        sampler.add(self.monotonic(), total_calls, run.written)
        cps_10s = sampler.rate(10.0, 1, min_span_s=3.0)

        calls = _int(f, "calls")
        per_image = calls / run.written if run.written and calls else 1.0
        images_per_s, basis = sampler.rate(60.0, 2, min_span_s=10.0), "watch"
        if images_per_s is None and cps_1m > 0:
            images_per_s, basis = cps_1m / per_image, "calls"
        if images_per_s is None and run.written:
            images_per_s, basis = run.written / max(1.0, now - created), "average"
        eta = finish = None
        if run.outstanding == 0:
            eta, finish = 0.0, now
        elif images_per_s:
            eta = run.outstanding / images_per_s
            finish = now + eta
        deadline = self._deadline(f, created)
        on_time = None if deadline is None or finish is None else finish <= deadline

        price = self.settings.price_per_1000_calls
        cost = projected = None
        if price is not None:
            cost = calls * price / 1000
            projected = (calls + run.outstanding * per_image) * price / 1000

        stop = next((a.stop for a in accounts if a.stop), None)
        circuit = next(
            (a.circuit.get("state", "closed") for a in accounts if a.circuit.get("state") != "closed"),
            "closed",
        )
        quota = next((a for a in accounts if a.quota_limit is not None), None)
        quota_left = (
            max(0, quota.quota_limit - quota.quota_used)
            if quota is not None and quota.quota_limit is not None and quota.quota_used is not None
            else None
        )
        info = self._workers(run.run_id)
        return RunFigures(
            run_id=run.run_id,
            state=run.state,
            fleet=self._fleet(run, stop, circuit, quota_left),
            source=f.get("source", ""),
            created_at_s=created,
            age_s=max(0.0, now - created),
            enqueued=run.enqueued,
            written=run.written,
            failed=_int(f, "images_failed"),
            parked=run.parked,
            pending=run.outstanding,
            skipped=_int(f, "images_skipped"),
            plates=_int(f, "plates"),
            calls=calls,
            stop_code=f.get("stop_code") or (stop or {}).get("code") or None,
            stop_message=(stop or {}).get("message") or None,
            unfinished=tuple(
                (e.source, e.published, e.reason or "its producer stopped answering", e.command)
                for e in run.unfinished_enqueues
            ),
            circuit=circuit,
            qps_limit=self.settings.qps,
            calls_per_s_10s=cps_10s,
            calls_per_s_1m=cps_1m,
            throttled_1m=throttled,
            quota_limit=quota.quota_limit if quota else None,
            quota_used=quota.quota_used if quota else None,
            quota_left=quota_left,
            quota_window=quota.quota_window if quota else None,
            quota_resets_at_s=quota.quota_resets_at_s if quota else None,
            images_per_s=images_per_s,
            eta_basis=basis if images_per_s else None,
            eta_s=eta,
            finish_at_s=finish,
            deadline_at_s=deadline,
            on_time=on_time,
            queue_depth=snap.queue_depth,
            chunks_unacked=snap.unacked,
            workers=info.nodes if info else None,
            chunks_running=info.chunks_running if info else None,
            images_running=info.images_running if info else None,
            calls_in_flight=self._in_flight(accounts, now),
            price_per_1000_calls=price,
            cost=cost,
            cost_projected=projected,
            at_s=now,
        )

    # -- parts ---------------------------------------------------------------------------------
    def _accounts(self, snap: Snapshot) -> list[AccountSnapshot]:
        return list(snap.accounts)

    def _last_minute(
        self, accounts: list[AccountSnapshot], now: float, span_s: float = 60.0
    ) -> tuple[float, int]:
        """Calls per second and throttled answers over the last ``span_s`` (at most 60 s; less
        for a run younger than a minute), from the current and the previous minute's counters,
        the previous one weighted by the share of it inside the span."""
        weight = max(0.0, span_s - now % 60) / 60
        calls = throttled = 0.0
        for a in accounts:
            current = read_call_stats(self.r, self.keys, a.account, last_minutes=1, now_s=now)
            previous = read_call_stats(self.r, self.keys, a.account, last_minutes=1, now_s=now - 60)
            calls += current.calls + previous.calls * weight
            throttled += _throttled(current) + _throttled(previous) * weight
        return calls / span_s, round(throttled)

    def _in_flight(self, accounts: list[AccountSnapshot], now: float) -> int | None:
        """Calls the account's worker processes have in flight (their call slots in use)."""
        try:
            return sum(read_in_flight(self.r, self.keys, a.account, now)[0] for a in accounts)
        except redis.RedisError:
            return None

    def _deadline(self, fields: Mapping[str, str], created: float) -> float | None:
        if fields.get("deadline"):
            try:
                return parse_deadline(fields["deadline"], created)
            except ConfigError:
                pass  # an unreadable --deadline of the run: fall back on the setting
        text = self.settings.run_deadline
        return parse_deadline(text, created) if text else None

    def _workers(self, run_id: str) -> WorkerInfo | None:
        if self.workers is None:
            return None
        now = self.monotonic()
        cached = self._workers_cache.get(run_id)
        if cached is None or now - cached[0] >= self.workers_every_s:
            cached = (now, self.workers(run_id))
            self._workers_cache[run_id] = cached
        return cached[1]

    @staticmethod
    def _fleet(run: RunSummary, stop: dict[str, Any] | None, circuit: str, quota_left: int | None) -> str:
        state = run.state
        if state == "done" and run.outstanding == 0:
            return "done"
        if state == "stopped" or stop:
            code = run.fields.get("stop_code") or (stop or {}).get("code") or "?"
            return f"stopped ({code})"
        if state in PAUSED_STATES:
            return state
        if circuit != "closed":
            return "circuit_open"
        if quota_left == 0:
            return "quota_exhausted"
        return state
