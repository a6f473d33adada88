"""The Redis backend: every step is one Lua script (the ``*.lua`` files next to this module).

Each script reads the time with ``TIME`` on the Redis server, so the hosts' clocks never matter.
Scripts are registered once per client and run with EVALSHA; after ``SCRIPT FLUSH`` or a Redis
restart the server answers NOSCRIPT and redis-py loads the script again and retries. Connection
trouble (a restart, a failover) is retried for up to ``unreachable_s``; after that, and on any
other Redis error, the step raises :class:`~workers.errors.RedisUnavailable`: no call goes out
without coordination, and the pipeline waits for Redis to come back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from workers.errors import RedisUnavailable
from workers.ratelimit.backend import QuotaState, RateState
from workers.ratelimit.gcra import Grant, Rate

__all__ = ["SCRIPTS", "RedisBackend"]

_HERE = Path(__file__).resolve().parent
# Scripts that read or change the adaptive factor run with adapt.lua's functions in front.
_ADAPTIVE = ("gcra_reserve", "gcra_throttled", "gcra_peek")
SCRIPTS = (
    "gcra_reserve",
    "gcra_give_back",
    "gcra_throttled",
    "gcra_peek",
    "quota_window",
    "quota_release",
)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class RedisBackend:
    """A :class:`~workers.ratelimit.backend.Backend` shared by every process using this Redis.

    ``client``: a ``redis.asyncio.Redis`` (bound to the running event loop, like any asyncio
    client); ``unreachable_s``: how long connection errors are retried before giving up, seconds.
    """

    def __init__(self, client: Redis, *, unreachable_s: float = 5.0) -> None:
        self.client = client
        self.unreachable_s = unreachable_s
        # Connection errors seen so far: after one, Redis may have restarted and lost writes,
        # so the quota's next reservation carries what this process had counted.
        self.outages = 0
        prelude = (_HERE / "adapt.lua").read_text(encoding="utf-8")
        self._scripts = {
            name: client.register_script(
                (prelude if name in _ADAPTIVE else "") + (_HERE / f"{name}.lua").read_text(encoding="utf-8")
            )
            for name in SCRIPTS
        }

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[Any], doing: str) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.unreachable_s
        delay_s = 0.05
        while True:
            try:
                return await self._scripts[name](keys=keys, args=args)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                self.outages += 1
                # A timed-out script may still have run: a lost slot or a leaked quota
                # reservation, both on the safe side.
                if loop.time() + delay_s > deadline:
                    raise _unreachable(exc, doing) from None
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 1.0)
            except RedisError as exc:
                raise _unreachable(exc, doing) from None

    async def gcra_reserve(self, key: str, adapt_key: str, rate: Rate) -> Grant:
        slot, now, tat, increment, factor = await self._run(
            "gcra_reserve",
            [key, adapt_key],
            [rate.interval_us, rate.burst, *rate.reaction.args],
            "reserving a rate-limit slot",
        )
        return Grant(int(slot), int(now), int(tat), int(increment), int(factor))

    async def gcra_give_back(self, key: str, grant: Grant) -> bool:
        done = await self._run(
            "gcra_give_back", [key], [grant.tat_us, grant.increment_us], "giving a slot back"
        )
        return bool(int(done))

    async def gcra_throttled(self, key: str, adapt_key: str, rate: Rate) -> tuple[int, int]:
        factor, kind = await self._run(
            "gcra_throttled",
            [key, adapt_key],
            [repr(rate.calls_per_s), *rate.reaction.args],
            "recording a throttle",
        )
        return int(factor), int(kind)

    async def gcra_peek(self, key: str, adapt_key: str, rate: Rate) -> RateState:
        factor, ahead = await self._run(
            "gcra_peek", [key, adapt_key], rate.reaction.args, "reading the rate limit"
        )
        return RateState(int(factor), int(ahead))

    async def _quota(
        self,
        prefix: str,
        window: str,
        limit: int,
        utc_offset_s: int,
        mode: str,
        seen: tuple[str, int] | None = None,
    ) -> QuotaState:
        seen_key, seen_used = seen if seen is not None else ("", 0)
        granted, used, key, resets = await self._run(
            "quota_window",
            [],
            [prefix, window, limit, utc_offset_s, mode, seen_key, seen_used],
            "reserving quota" if mode == "reserve" else "reading the quota",
        )
        resets_at = int(resets)
        return QuotaState(bool(int(granted)), int(used), _text(key), None if resets_at < 0 else resets_at)

    async def quota_reserve(
        self, prefix: str, window: str, limit: int, utc_offset_s: int, seen: tuple[str, int] | None = None
    ) -> QuotaState:
        return await self._quota(prefix, window, limit, utc_offset_s, "reserve", seen)

    async def quota_peek(self, prefix: str, window: str, utc_offset_s: int) -> QuotaState:
        return await self._quota(prefix, window, 0, utc_offset_s, "peek")

    async def quota_release(self, window_key: str) -> bool:
        done = await self._run("quota_release", [window_key], [], "giving quota back")
        return bool(int(done))


def _unreachable(exc: RedisError, doing: str) -> RedisUnavailable:
    return RedisUnavailable(f"Redis failed while {doing} ({type(exc).__name__}); not calling")
