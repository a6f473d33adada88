"""Per-call counters: how many API calls ended with which code, and how long they took.

Workers count every call through :class:`CallCounter` (the engine hooks its ``record`` to every
call); the ``carnumber metrics`` exporter reads the counts back with :func:`read_call_stats`. Two
hashes per account, both bumped with HINCRBY in one pipeline:

* ``calls:{account}:total`` — never expires; a Prometheus counter.
* ``calls:{account}:m:YYYYMMDDHHMM`` — one per UTC minute (the worker's clock), expiring after
  ``minute_ttl_s``; enough to answer "calls by code in the last N minutes" without Prometheus.

Fields: ``c:{code}`` (calls that ended with that code; ``ok`` for an answer), ``lat_n`` and
``lat_sum_ms`` (calls with a known latency, and their total, milliseconds) and ``lat_le:{ms}``
(cumulative histogram buckets). Counts are buffered and written at most every ``flush_s``
seconds, so a call costs no Redis round trip of its own; a Redis error is logged and the counts
are kept for the next flush, never raised: a statistic must not cost a result.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis

from workers.keys import Keys

__all__ = [
    "IN_FLIGHT_FRESH_S",
    "LATENCY_BUCKETS_MS",
    "CallCounter",
    "CallStats",
    "minute_bucket",
    "prune_in_flight",
    "read_call_stats",
    "read_in_flight",
    "write_in_flight",
]

log = logging.getLogger(__name__)

# Upper bounds of the latency histogram, milliseconds (+Inf is ``lat_n``).
LATENCY_BUCKETS_MS = (100, 250, 500, 1000, 2500, 5000, 10000, 30000)
_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def minute_bucket(now_s: float) -> str:
    """The per-minute hash suffix for Unix time ``now_s``: ``m:YYYYMMDDHHMM`` (UTC)."""
    return "m:" + datetime.fromtimestamp(now_s, UTC).strftime("%Y%m%d%H%M")


def _code_field(code: str) -> str:
    # Codes become Prometheus label values: keep them a bounded, printable set.
    return "c:" + (code if _CODE.fullmatch(code) else "other")


class CallCounter:
    """Counts API call outcomes into Redis for one account. Thread-safe; cheap per call.

    ``flush_s``: the longest a count waits in memory, seconds; ``minute_ttl_s``: lifetime of a
    per-minute hash, seconds; ``clock``: Unix seconds (tests inject one).
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        account: str,
        *,
        flush_s: float = 1.0,
        minute_ttl_s: int = 24 * 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.r = client
        self.keys = keys
        self.account = account
        self.flush_s = flush_s
        self.minute_ttl_s = minute_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[str, Counter[str]] = {}
        self._runs: Counter[str] = Counter()  # calls per run, not yet written
        self._last_flush = clock()

    def __call__(self, code: str, elapsed_s: float | None = None) -> None:
        """Count one call that ended with ``code`` ("ok" for an answer), taking ``elapsed_s``;
        writes what is buffered when ``flush_s`` has passed (a Redis round trip, so an event
        loop uses :meth:`record` and flushes from a thread instead)."""
        if self.record(code, elapsed_s):
            self.flush()

    def record(self, code: str, elapsed_s: float | None = None, run_id: str | None = None) -> bool:
        """Buffer one call's outcome without any I/O; ``True`` when a flush is due. ``run_id``:
        also count the call in that run's ``calls`` (as it is made, so a node that dies mid-chunk
        has counted what it paid for, up to its last flush)."""
        now = self._clock()
        fields = Counter({_code_field(code): 1})
        if elapsed_s is not None and elapsed_s >= 0:
            ms = round(elapsed_s * 1000)
            fields["lat_n"] = 1
            fields["lat_sum_ms"] = ms
            for bound in LATENCY_BUCKETS_MS:
                if ms <= bound:
                    fields[f"lat_le:{bound}"] = 1
        with self._lock:
            self._pending.setdefault(minute_bucket(now), Counter()).update(fields)
            if run_id:
                self._runs[run_id] += 1
            return now - self._last_flush >= self.flush_s

    def flush(self) -> None:
        """Write what is buffered (one pipeline). Call it when a chunk ends, too."""
        with self._lock:
            pending, self._pending = self._pending, {}
            runs, self._runs = self._runs, Counter()
            self._last_flush = self._clock()
        if not pending and not runs:
            return
        total: Counter[str] = Counter()
        pipe = self.r.pipeline(transaction=False)
        for bucket, counts in pending.items():
            key = self.keys.calls(self.account, bucket)
            for name, n in counts.items():
                pipe.hincrby(key, name, n)
            pipe.expire(key, self.minute_ttl_s)
            total.update(counts)
        total_key = self.keys.calls(self.account, "total")
        for name, n in total.items():
            pipe.hincrby(total_key, name, n)
        for run_id, n in runs.items():
            pipe.hincrby(self.keys.run(run_id), "calls", n)
        try:
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("call counters not written (%s); kept for the next flush", type(exc).__name__)
            with self._lock:
                for bucket, counts in pending.items():
                    self._pending.setdefault(bucket, Counter()).update(counts)
                self._runs.update(runs)


@dataclass(frozen=True, slots=True)
class CallStats:
    """Counts read back from one hash. ``buckets``: ``(upper bound s, cumulative count)``."""

    by_code: dict[str, int] = field(default_factory=dict)
    latency_count: int = 0
    latency_sum_s: float = 0.0
    buckets: tuple[tuple[float, int], ...] = ()

    @property
    def calls(self) -> int:
        return sum(self.by_code.values())


def _decode(raw: dict[bytes, bytes]) -> Counter[str]:
    return Counter({k.decode(): int(v) for k, v in raw.items()})


def _parse(fields: Counter[str]) -> CallStats:
    by_code = {k[2:]: v for k, v in fields.items() if k.startswith("c:")}
    buckets = tuple((b / 1000, fields.get(f"lat_le:{b}", 0)) for b in LATENCY_BUCKETS_MS)
    return CallStats(
        by_code=by_code,
        latency_count=fields.get("lat_n", 0),
        latency_sum_s=fields.get("lat_sum_ms", 0) / 1000,
        buckets=buckets,
    )


def read_call_stats(
    client: redis.Redis,
    keys: Keys,
    account: str,
    last_minutes: int | None = None,
    now_s: float | None = None,
) -> CallStats:
    """All-time counts (``last_minutes=None``) or the sum of the last ``last_minutes`` UTC
    minutes up to ``now_s`` (default: now), the current minute included. Raises RedisError."""
    if last_minutes is None:
        return _parse(_decode(client.hgetall(keys.calls(account, "total"))))
    now = time.time() if now_s is None else now_s
    pipe = client.pipeline(transaction=False)
    for i in range(last_minutes):
        pipe.hgetall(keys.calls(account, minute_bucket(now - 60 * i)))
    merged: Counter[str] = Counter()
    for raw in pipe.execute():
        merged.update(_decode(raw))
    return _parse(merged)


# A process's in-flight figure older than this is a process that stopped reporting (gone).
IN_FLIGHT_FRESH_S = 10.0


def write_in_flight(
    client: redis.Redis, keys: Keys, account: str, process: str, calls: int, now_s: float
) -> None:
    """Record that ``process`` has ``calls`` API calls in flight (its call slots in use). Raises
    ``RedisError``."""
    key = keys.in_flight(account)
    pipe = client.pipeline(transaction=False)
    pipe.hset(key, process, f"{calls} {now_s:.0f}")
    pipe.expire(key, 3600)
    pipe.execute()


def prune_in_flight(
    client: redis.Redis, keys: Keys, account: str, now_s: float, older_than_s: float = 600.0
) -> int:
    """Forget processes that have not reported for ``older_than_s`` (dead, or restarted with a
    new pid): the hash keeps one field per live process. Returns how many. Raises ``RedisError``."""
    key = keys.in_flight(account)
    stale = []
    for process, raw in client.hgetall(key).items():
        at = (raw.decode() if isinstance(raw, bytes) else str(raw)).partition(" ")[2]
        try:
            if now_s - float(at) > older_than_s:
                stale.append(process)
        except ValueError:
            stale.append(process)
    if stale:
        client.hdel(key, *stale)
    return len(stale)


def read_in_flight(
    client: redis.Redis, keys: Keys, account: str, now_s: float | None = None
) -> tuple[int, int]:
    """(calls in flight, processes reporting) over every worker process of the account that
    reported in the last :data:`IN_FLIGHT_FRESH_S`. Raises ``RedisError``."""
    now_s = time.time() if now_s is None else now_s
    calls = processes = 0
    for raw in client.hvals(keys.in_flight(account)):
        n, _, at = (raw.decode() if isinstance(raw, bytes) else str(raw)).partition(" ")
        if at and now_s - float(at) <= IN_FLIGHT_FRESH_S:
            calls += int(n)
            processes += 1
    return calls, processes
