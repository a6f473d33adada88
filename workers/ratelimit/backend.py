"""The storage seam: what the rate limiter and the quota need from wherever their state lives.

Each method is one atomic step that reads the time from the store itself, so the algorithm in
:mod:`workers.ratelimit.gcra`, :mod:`~workers.ratelimit.adapt` and
:mod:`~workers.ratelimit.windows` is the only logic and the store's clock is the only clock. Two
implementations: :class:`~workers.ratelimit.redis_backend.RedisBackend` (one Lua script per step,
shared by every process of the fleet) and :class:`~workers.ratelimit.memory.MemoryBackend` (one
process, an injected clock).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from workers.ratelimit.gcra import Grant, Rate

__all__ = ["Backend", "QuotaState", "RateState"]


@dataclass(frozen=True, slots=True)
class QuotaState:
    """A quota counter as one step left it. ``granted``: whether a reservation was taken;
    ``used``: calls counted in the window now; ``resets_at_s``: Unix seconds, ``None`` = never."""

    granted: bool
    used: int
    window_key: str
    resets_at_s: int | None


@dataclass(frozen=True, slots=True)
class RateState:
    """A read-only look at a limit: the factor in force (ppm) and how far ahead it is booked."""

    factor_ppm: int
    booked_ahead_us: int


class Backend(Protocol):
    async def gcra_reserve(self, key: str, adapt_key: str, rate: Rate) -> Grant:
        """Reserve the next slot of ``key`` (``adapt_key`` holds the throttle state)."""
        ...

    async def gcra_give_back(self, key: str, grant: Grant) -> bool:
        """Return an unused slot if no later one was reserved; ``True`` when it was returned."""
        ...

    async def gcra_throttled(self, key: str, adapt_key: str, rate: Rate) -> tuple[int, int]:
        """Record a throttling answer; returns the factor now in force (ppm) and what the throttle
        did (:data:`~workers.ratelimit.adapt.HELD`, ``LONE`` or ``REPEATED``)."""
        ...

    async def gcra_peek(self, key: str, adapt_key: str, rate: Rate) -> RateState:
        """Read the state without changing it."""
        ...

    async def quota_reserve(
        self, prefix: str, window: str, limit: int, utc_offset_s: int, seen: tuple[str, int] | None = None
    ) -> QuotaState:
        """Count one call in the current window unless ``limit`` calls are counted already.
        ``seen``: the caller's highest count of a window key; a counter found below it (Redis lost
        its last writes in a crash) is raised to it first, so the quota is never overrun."""
        ...

    async def quota_peek(self, prefix: str, window: str, utc_offset_s: int) -> QuotaState:
        """The current window's counter, unchanged (``granted`` is False)."""
        ...

    async def quota_release(self, window_key: str) -> bool:
        """Uncount one call in ``window_key`` (the window it was reserved in), never below 0."""
        ...
