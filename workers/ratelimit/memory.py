"""The in-memory backend: the same steps as the Redis scripts, for one process and for tests.

State lives in this object, so only limiters and quotas built on the *same* instance share a
limit. Each step is synchronous code inside a coroutine, hence atomic on one event loop. The clocks
are injected: ``clock`` (seconds, monotonic) paces the rate limit and ``wall_clock`` (Unix
seconds) names the quota day, so a test can drive both.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from workers.ratelimit import adapt, gcra
from workers.ratelimit.adapt import Adapt
from workers.ratelimit.backend import QuotaState, RateState
from workers.ratelimit.gcra import Grant, Rate
from workers.ratelimit.windows import window_key

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """A :class:`~workers.ratelimit.backend.Backend` whose state is a few dicts."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._tat: dict[str, int] = {}
        self._adapt: dict[str, Adapt] = {}
        self._counts: dict[str, int] = {}
        self.outages = 0  # the Redis backend's count of connection errors; tests set it here

    def _now_us(self) -> int:
        return round(self._clock() * adapt.PPM)

    def _factor(self, adapt_key: str, now_us: int, rate: Rate) -> float:
        return adapt.factor_at(self._adapt.get(adapt_key), now_us, rate.reaction)

    async def gcra_reserve(self, key: str, adapt_key: str, rate: Rate) -> Grant:
        now = self._now_us()
        grant = gcra.reserve(self._tat.get(key), now, rate, self._factor(adapt_key, now, rate))
        self._tat[key] = grant.tat_us
        return grant

    async def gcra_give_back(self, key: str, grant: Grant) -> bool:
        restored = gcra.give_back(self._tat.get(key), grant)
        if restored is None:
            return False
        self._tat[key] = restored
        return True

    async def gcra_throttled(self, key: str, adapt_key: str, rate: Rate) -> tuple[int, int]:
        now = self._now_us()
        state, kind = adapt.on_throttle(
            self._adapt.get(adapt_key), self._tat.get(key), now, rate.calls_per_s, rate.reaction
        )
        self._adapt[adapt_key] = state
        return int(adapt.factor_at(state, now, rate.reaction)), kind

    async def gcra_peek(self, key: str, adapt_key: str, rate: Rate) -> RateState:
        now = self._now_us()
        return RateState(int(self._factor(adapt_key, now, rate)), max(0, self._tat.get(key, now) - now))

    async def quota_reserve(
        self, prefix: str, window: str, limit: int, utc_offset_s: int, seen: tuple[str, int] | None = None
    ) -> QuotaState:
        win = window_key(prefix, window, self._wall_clock(), utc_offset_s)
        used = self._counts.get(win.key, 0)
        if seen is not None and seen[0] == win.key and used < seen[1]:
            used = self._counts[win.key] = seen[1]
        if used >= limit:
            return QuotaState(False, used, win.key, win.resets_at_s)
        self._counts[win.key] = used + 1
        return QuotaState(True, used + 1, win.key, win.resets_at_s)

    async def quota_peek(self, prefix: str, window: str, utc_offset_s: int) -> QuotaState:
        win = window_key(prefix, window, self._wall_clock(), utc_offset_s)
        return QuotaState(False, self._counts.get(win.key, 0), win.key, win.resets_at_s)

    async def quota_release(self, window_key: str) -> bool:
        used = self._counts.get(window_key, 0)
        if used <= 0:
            return False
        self._counts[window_key] = used - 1
        return True
