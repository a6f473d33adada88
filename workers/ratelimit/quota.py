"""A call quota for the whole fleet: ``await quota.reserve()`` right before each call is sent.

Every attempt costs money, retries included, so each one reserves a call first; the reservation
is atomic in the backend, so however many workers race, the window never counts more than
``limit``. When the quota is spent ``reserve`` raises :class:`~workers.errors.QuotaExhausted` (a
:class:`~workers.errors.Paused`: the image stays pending, the pipeline parks it and a later run
resumes it). A reservation whose call was never sent is handed back with :meth:`release`, to
the window :meth:`reserve` counted it in.
Windows: ``day`` (calendar day, UTC by default, from the backend's clock) or ``total``.
After a connection error, the next reservation carries the highest count this worker has seen
in the window, so a counter that went back (Redis crashed and its AOF lost the last second of
increments) is raised to it before anything is granted: the first reservation of any worker that
counted in the lost second restores its count, and the quota is never overrun by calls that
worker knew of.
See ``ops/design/rate-limit.md``.
"""

from __future__ import annotations

import datetime as dt

from workers.errors import ConfigError, QuotaExhausted
from workers.ratelimit.backend import Backend, QuotaState
from workers.ratelimit.windows import check_window

__all__ = ["CallQuota"]


class CallQuota:
    """At most ``limit`` calls per window for everyone using ``key_prefix`` (``None``: no quota).

    Counters are ``{key_prefix}:day:YYYY-MM-DD`` (the day at ``utc_offset_s`` from UTC, UTC by
    default; expires a day after the day ends) or ``{key_prefix}:total``. Raises
    :class:`~workers.errors.ConfigError` for bad arguments.
    """

    def __init__(
        self,
        backend: Backend,
        key_prefix: str,
        limit: int | None,
        window: str = "day",
        *,
        utc_offset_s: int = 0,
    ) -> None:
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise ConfigError(f"quota limit must be an integer >= 0 or None, got {limit!r}")
        check_window(window, utc_offset_s)
        self.backend = backend
        self.key_prefix = key_prefix.rstrip(":")
        self.limit = limit
        self.window = window
        self.utc_offset_s = utc_offset_s
        self._seen: tuple[str, int] | None = None  # the highest count seen: (window key, used)
        self._outages = 0  # the backend's outage count when _seen was last handed to it

    def __repr__(self) -> str:
        return f"CallQuota(key_prefix={self.key_prefix!r}, limit={self.limit}, window={self.window!r})"

    async def reserve(self) -> str | None:
        """Count one call about to be sent; returns the window's key it was counted in (``None``
        without a quota), which :meth:`release` takes if the call is not sent after all.
        Raises :class:`QuotaExhausted` when ``limit`` calls are already counted in this window,
        :class:`~workers.errors.Paused` when the backend is unreachable."""
        if self.limit is None:
            return None
        # Only after a connection error (Redis may have restarted and lost writes): in normal
        # running our own releases lower the counter, and a floor would count them twice.
        outages = getattr(self.backend, "outages", 0)
        seen = self._seen if outages != self._outages else None
        state = await self.backend.quota_reserve(
            self.key_prefix, self.window, self.limit, self.utc_offset_s, seen
        )
        self._outages = outages
        if self._seen is None or self._seen[0] != state.window_key or state.used > self._seen[1]:
            self._seen = (state.window_key, state.used)
        if not state.granted:
            raise self._exhausted(state, self.limit)
        return state.window_key

    async def release(self, reserved: str | None) -> None:
        """Hand back one reservation whose call was not sent after all: ``reserved`` is what
        :meth:`reserve` returned for it. The call goes back to the window it was counted in, so
        one taken before midnight never frees a call in the new day, whatever other tasks have
        reserved since. ``None`` (no quota when it was reserved) does nothing."""
        if self.limit is None or reserved is None:
            return
        await self.backend.quota_release(reserved)

    async def remaining(self) -> int | None:
        """Calls left in the current window; ``None`` when there is no quota."""
        if self.limit is None:
            return None
        return max(0, self.limit - (await self._peek()).used)

    async def used(self) -> int:
        """Calls counted in the current window (also without a limit: 0 then, nothing is kept)."""
        return 0 if self.limit is None else (await self._peek()).used

    async def _peek(self) -> QuotaState:
        return await self.backend.quota_peek(self.key_prefix, self.window, self.utc_offset_s)

    def _exhausted(self, state: QuotaState, limit: int) -> QuotaExhausted:
        if state.resets_at_s is None:
            where = "in total"
            when = "it never resets: raise CARNUMBER_QUOTA to continue"
        else:
            date = state.window_key.rsplit(":", 1)[-1]
            zone = _zone(self.utc_offset_s)
            resets = dt.datetime.fromtimestamp(state.resets_at_s, dt.UTC)
            where = f"on {date} ({zone} day)"
            when = f"it resets at {resets:%Y-%m-%dT%H:%M:%SZ}"
        exc = QuotaExhausted(f"call quota spent: {state.used} of {limit} calls used {where}; {when}")
        exc.limit = limit
        exc.window = self.window
        exc.resets_at_s = state.resets_at_s
        return exc


def _zone(utc_offset_s: int) -> str:
    if utc_offset_s == 0:
        return "UTC"
    sign = "+" if utc_offset_s > 0 else "-"
    hours, rest = divmod(abs(utc_offset_s), 3600)
    return f"UTC{sign}{hours:02d}:{rest // 60:02d}"
