"""The server's QPS limit: at most ``qps`` accepted calls per whole wall-clock second, per key
(the app passes the account of the key: keys grouped by ``--accounts`` share one counter).

The real service limits calls per account (10 QPS for this action). Here a "second" is
``int(time.time())``: the counter for a key resets when the second changes, so the limit is exact
per calendar second (a client may still send 2 x qps across a second boundary, as with the real
fixed-window limiter). ``qps == 0`` means unlimited.
"""

from __future__ import annotations

import math

__all__ = ["SecondWindowLimiter"]


class SecondWindowLimiter:
    """Fixed one-second windows per key; O(1) memory per key. Not thread-safe (one event loop)."""

    def __init__(self, qps: int) -> None:
        if qps < 0:
            raise ValueError("qps must be >= 0 (0 = unlimited)")
        self.qps = qps
        self._windows: dict[str, tuple[int, int]] = {}  # key -> (second, count)

    def try_acquire(self, key: str, now: float) -> bool:
        """Count one call for ``key`` at ``now`` (epoch seconds); False when over the limit."""
        if self.qps == 0:
            return True
        second = int(now)
        window, count = self._windows.get(key, (second, 0))
        if window != second:
            count = 0
        if count >= self.qps:
            self._windows[key] = (second, count)
            return False
        self._windows[key] = (second, count + 1)
        return True

    @staticmethod
    def retry_after_ms(now: float) -> int:
        """Milliseconds until the next whole second (at least 1)."""
        return max(1, math.ceil((math.floor(now) + 1 - now) * 1000))
