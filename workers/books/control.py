"""Pause or cancel one run across every host, while other runs of the account go on.

``carnumber pause RUN`` / ``carnumber cancel RUN`` set ``{prefix}:run:{id}:control`` to
``paused`` or ``cancelled``; every admission of a call for that run asks :meth:`RunSwitch.check`
(right before the quota is reserved, after the token wait, so a call that waited for its token
is still stopped), which reads the key at most once per ``cache_s`` per run and raises
:class:`RunPaused`. The image stays pending and its chunk is parked with the run's state, as for a
fleet stop; ``carnumber resume RUN`` clears the key and publishes the parked chunks again.

The commands wait ``SETTLE_S`` (longer than ``cache_s`` plus a request's way onto the wire)
before returning, so once they return no new call for the run starts anywhere: the calls already
in flight finish, and that is all. Redis errors become
:class:`~workers.errors.RedisUnavailable` (the pipeline waits for Redis).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from workers.errors import Paused, RedisUnavailable
from workers.keys import Keys

if TYPE_CHECKING:
    import redis
    from redis.asyncio import Redis

__all__ = ["CONTROLS", "SETTLE_S", "RunPaused", "RunSwitch", "set_control"]

CONTROLS = ("paused", "cancelled")
SETTLE_S = 1.5


class RunPaused(Paused):
    """An operator paused or cancelled this run (``state`` says which)."""

    def __init__(self, run_id: str, control: str) -> None:
        super().__init__(f"run {run_id} {control} by an operator")
        self.state = control
        self.run_id = run_id


class RunSwitch:
    """Per-run pause and cancel flags over ``redis.asyncio`` (``None``: never paused)."""

    def __init__(self, client: Redis | None, keys: Keys, *, cache_s: float = 0.5) -> None:
        self.client = client
        self.keys = keys
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, str | None]] = {}  # run -> (fresh until, control)

    async def check(self, run_id: str) -> None:
        """Raise :class:`RunPaused` while ``run_id`` is paused or cancelled."""
        if self.client is None:
            return
        now = time.monotonic()
        fresh_until, control = self._cache.get(run_id, (0.0, None))
        if now >= fresh_until:
            try:
                raw = await self.client.get(self.keys.run_control(run_id))
            except RedisError as exc:
                raise RedisUnavailable(
                    f"Redis unreachable while reading run {run_id}'s pause flag ({type(exc).__name__})"
                ) from None
            control = raw.decode() if isinstance(raw, bytes) else raw
            self._cache[run_id] = (now + self.cache_s, control)
            if len(self._cache) > 1000:  # runs come and go: keep the cache small
                self._cache = {run_id: self._cache[run_id]}
        if control in CONTROLS:
            raise RunPaused(run_id, control)


def set_control(client: redis.Redis, keys: Keys, run_id: str, control: str | None) -> None:
    """Pause or cancel ``run_id`` (``control``), or lift it (``None``). Sync, for the CLI."""
    if control is None:
        client.delete(keys.run_control(run_id))
        return
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
    client.set(keys.run_control(run_id), control)
