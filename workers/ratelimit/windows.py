"""Quota windows: which counter a call at a given time counts against. Pure date arithmetic.

``day``: one counter per calendar day, ``{prefix}:day:YYYY-MM-DD``, midnight to midnight at
``utc_offset_s`` from UTC (0, the default, is the UTC day). It resets at the next midnight and
the key expires a day after that, so yesterday's count can still be read. ``total``: one counter,
``{prefix}:total``, that never resets. ``quota_window.lua`` is this module's twin in Redis.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from workers.errors import ConfigError

__all__ = ["DAY_S", "WINDOWS", "WindowKey", "check_window", "window_key"]

DAY_S = 86_400
WINDOWS = ("day", "total")
# How long a day's counter outlives the day, seconds.
KEEP_AFTER_S = DAY_S


@dataclass(frozen=True, slots=True)
class WindowKey:
    """The counter for one window: its Redis key, when it resets and when the key may expire
    (Unix seconds; ``None`` for ``total``, which does neither)."""

    key: str
    resets_at_s: int | None
    expire_at_s: int | None


def check_window(window: str, utc_offset_s: int) -> None:
    if window not in WINDOWS:
        raise ConfigError(f"quota window must be one of {', '.join(WINDOWS)}, got {window!r}")
    if not isinstance(utc_offset_s, int) or not -DAY_S < utc_offset_s < DAY_S:
        raise ConfigError(f"utc_offset_s must be an integer within one day, got {utc_offset_s!r}")


def window_key(prefix: str, window: str, now_s: float, utc_offset_s: int = 0) -> WindowKey:
    """The counter a call at Unix time ``now_s`` counts against."""
    if window == "total":
        return WindowKey(f"{prefix}:total", None, None)
    day = math.floor((now_s + utc_offset_s) / DAY_S)
    date = dt.date(1970, 1, 1) + dt.timedelta(days=day)
    resets = (day + 1) * DAY_S - utc_offset_s
    return WindowKey(f"{prefix}:day:{date.isoformat()}", resets, resets + KEEP_AFTER_S)
