"""What the fleet's Redis says right now, as plain data: the monitoring side of ``carnumber metrics``.

:meth:`Monitor.snapshot` reads, and never writes: the recent runs (:class:`~workers.books.runs.RunStore`),
the broker queue's depth and the broker's unacknowledged (in-flight) messages, and for every
account it finds (the configured one, plus any with a stop flag, circuit, rate, quota or call
counters under the key prefix): the fleet stop flag and the circuit breaker
(:mod:`workers.fleet`), the quota counter and the adaptive rate factor (:mod:`workers.ratelimit`),
and the per-call counters (:mod:`workers.metrics`). The snapshot also carries the configured
``price_per_1000_calls`` (None when not set), so the exporter can price each run's calls as
``carnumber status`` and ``carnumber report`` do. Redis trouble yields a snapshot with
``redis_up=False`` instead of an exception, so a scrape still answers and the alert can fire.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aredis

from workers.books.runs import RunStore, RunSummary
from workers.config import Settings
from workers.errors import CarnumberError
from workers.keys import Keys, account_tag
from workers.metrics import CallStats, read_call_stats

__all__ = ["UNACKED_KEY", "AccountSnapshot", "Monitor", "Snapshot"]

# kombu's Redis transport keeps delivered-but-unacknowledged messages in this hash (all queues).
UNACKED_KEY = "unacked"
_ACCOUNT_KEY = r"(?:stop|circuit|rate|quota|calls):([^:]+)"


@dataclass(frozen=True, slots=True)
class AccountSnapshot:
    """One account's switches and counters. ``stop``: ``FleetControl.status()`` (None = running);
    ``circuit``: ``CircuitBreaker.status()``; quota and rate fields are None where not configured
    (no quota, ``qps == 0``); ``rate_factor`` is 0..1; times are Unix seconds."""

    account: str
    stop: dict[str, Any] | None
    circuit: dict[str, Any]
    quota_window: str
    quota_limit: int | None = None
    quota_used: int | None = None
    quota_resets_at_s: int | None = None
    rate_qps: float = 0.0
    rate_factor: float | None = None
    rate_booked_ahead_s: float | None = None
    calls: CallStats = field(default_factory=CallStats)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """``price_per_1000_calls``: ``CARNUMBER_PRICE_PER_1000_CALLS`` in its own currency, None when
    not set (then no cost is exported)."""

    redis_up: bool
    queue: str
    queue_depth: int = 0
    unacked: int = 0
    runs: tuple[RunSummary, ...] = ()
    accounts: tuple[AccountSnapshot, ...] = ()
    duration_s: float = 0.0
    error: str | None = None
    price_per_1000_calls: float | None = None


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


class Monitor:
    """Reads a :class:`Snapshot` from the Redis of ``settings`` (``client``: a sync client on it;
    ``async_client``: makes a ``redis.asyncio.Redis`` on the same database for each snapshot)."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        async_client: Callable[[], aredis.Redis],
        *,
        recent_runs: int = 20,
    ) -> None:
        self.settings = settings
        self.r = client
        self.async_client = async_client
        self.keys = Keys(settings.key_prefix)
        self.runs = RunStore(client, self.keys)
        self.recent_runs = recent_runs
        self._account_re = re.compile(re.escape(self.keys.prefix) + ":" + _ACCOUNT_KEY)

    def snapshot(self) -> Snapshot:
        started = time.perf_counter()
        queue = self.settings.queue
        try:
            runs = tuple(s for s in (self.runs.get(r) for r in self.runs.runs(self.recent_runs)) if s)
            pipe = self.r.pipeline(transaction=False)
            pipe.llen(queue)
            pipe.hlen(UNACKED_KEY)
            depth, unacked = pipe.execute()
            accounts = asyncio.run(self._accounts(self.accounts()))
        except (redis.RedisError, OSError, CarnumberError) as exc:
            return Snapshot(
                redis_up=False,
                queue=queue,
                duration_s=time.perf_counter() - started,
                error=type(exc).__name__,
            )
        return Snapshot(
            redis_up=True,
            queue=queue,
            queue_depth=int(depth),
            unacked=int(unacked),
            runs=runs,
            accounts=accounts,
            duration_s=time.perf_counter() - started,
            price_per_1000_calls=self.settings.price_per_1000_calls,
        )

    def accounts(self) -> list[str]:
        """The configured limit group (``CARNUMBER_ACCOUNT``, else the AccessKeyId, when either is
        set) and every account with state under the prefix, sorted."""
        found: set[str] = set()
        if self.settings.account or self.settings.access_key_id:
            found.add(account_tag(self.settings.limit_group()))
        for raw in self.r.scan_iter(match=_glob_escape(self.keys.prefix) + ":*", count=1000):
            m = self._account_re.match(raw.decode("utf-8", "replace"))
            if m:
                found.add(m.group(1))
        return sorted(found)

    async def _accounts(self, accounts: list[str]) -> tuple[AccountSnapshot, ...]:
        ar = self.async_client()
        try:
            return tuple([await self._account(ar, a) for a in accounts])
        finally:
            await ar.aclose()

    async def _account(self, ar: aredis.Redis, account: str) -> AccountSnapshot:
        from workers.fleet import CircuitBreaker, FleetControl
        from workers.ratelimit import CallQuota, RateLimiter, RedisBackend

        s = self.settings
        backend = RedisBackend(ar, unreachable_s=1.0)
        stop = await FleetControl(ar, self.keys, account).status()
        circuit = await CircuitBreaker(ar, self.keys, account).status()
        quota = CallQuota(backend, self.keys.quota(account), s.quota, s.quota_window)
        used = resets = None
        if s.quota is not None:
            state = await backend.quota_peek(quota.key_prefix, quota.window, quota.utc_offset_s)
            used, resets = state.used, state.resets_at_s
        factor = ahead = None
        if s.qps > 0:
            rate = await RateLimiter(backend, self.keys.rate(account), s.qps, s.burst).state()
            factor, ahead = rate.factor_ppm / 1e6, rate.booked_ahead_us / 1e6
        return AccountSnapshot(
            account=account,
            stop=stop,
            circuit=circuit,
            quota_window=s.quota_window,
            quota_limit=s.quota,
            quota_used=used,
            quota_resets_at_s=resets,
            rate_qps=s.qps,
            rate_factor=factor,
            rate_booked_ahead_s=ahead,
            calls=read_call_stats(self.r, self.keys, account),
        )
