"""Time in the limiter and the quota: an injected clock for the memory backend, Redis's own
clock (and its calendar, computed in Lua) for the Redis backend, and day windows rolling over."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest
import redis
from redis.asyncio import Redis

from workers.admission import Gate
from workers.errors import QuotaExhausted
from workers.fleet import CircuitBreaker, FleetControl
from workers.keys import Keys
from workers.ratelimit import CallQuota, MemoryBackend, Rate, RateLimiter, RedisBackend
from workers.ratelimit.adapt import LONE
from workers.ratelimit.windows import DAY_S, window_key


class FakeClock:
    """Seconds that move only when told to."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_memory_backend_runs_on_the_injected_clock() -> None:
    clock = FakeClock(100.0)
    backend = MemoryBackend(clock=clock)
    rate = Rate(10, burst=2)

    async def body() -> None:
        waits = [(await backend.gcra_reserve("k", "k:adapt", rate)).wait_s for _ in range(4)]
        assert waits == [0, 0, 0.1, 0.2]
        clock.now += 10  # long idle: all booked slots are in the past
        assert (await backend.gcra_reserve("k", "k:adapt", rate)).wait_s == 0
        assert await backend.gcra_throttled("k", "k:adapt", rate) == (950_000, LONE)
        clock.now += 0.5  # climbing back at 5 % per second
        assert (await backend.gcra_peek("k", "k:adapt", rate)).factor_ppm == 975_000
        clock.now += 0.5
        grant = await backend.gcra_reserve("k", "k:adapt", rate)
        assert grant.factor_ppm == 1_000_000 and grant.increment_us == 100_000

    asyncio.run(body())


def test_memory_day_quota_rolls_over_at_utc_midnight_and_releases_into_its_own_day() -> None:
    wall = FakeClock(dt.datetime(2026, 3, 31, 23, 59, 59, tzinfo=dt.UTC).timestamp())
    backend = MemoryBackend(wall_clock=wall)
    quota = CallQuota(backend, "p:quota:abc", 3, "day")

    async def body() -> None:
        reserved = [await quota.reserve() for _ in range(3)]
        try:
            await quota.reserve()
        except QuotaExhausted as exc:
            assert "on 2026-03-31 (UTC day); it resets at 2026-04-01T00:00:00Z" in str(exc)
            assert exc.resets_at_s == wall.now + 1
        else:
            raise AssertionError("quota not enforced")
        wall.now += 1  # midnight: a new window
        assert await quota.remaining() == 3
        # The reservation taken before midnight goes back to the old day, not into the new one.
        await quota.release(reserved[-1])
        assert backend._counts == {"p:quota:abc:day:2026-03-31": 2}
        await quota.reserve()
        assert backend._counts["p:quota:abc:day:2026-04-01"] == 1
        assert await quota.remaining() == 2

    asyncio.run(body())


def test_redis_day_quota_rolls_over_at_the_day_boundary(
    redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    # Put the end of the quota day 1-2 s from Redis's now, with the day's UTC offset.
    sec, _usec = redis_client.time()
    offset = DAY_S - sec % DAY_S - 2

    async def body() -> None:
        client = Redis.from_url(redis_url)
        try:
            quota = CallQuota(RedisBackend(client), f"{key_prefix}:quota", 2, "day", utc_offset_s=offset)
            await quota.reserve()
            await quota.reserve()
            try:
                await quota.reserve()
            except QuotaExhausted as exc:
                resets = exc.resets_at_s
                assert resets is not None and 0 < resets - time.time() <= 3
            else:
                raise AssertionError("quota not enforced")
            first_day = {k.decode() for k in await client.keys(f"{key_prefix}:quota:day:*")}
            await asyncio.sleep(max(0.0, resets - time.time()) + 0.05)
            while True:  # the two clocks may differ by a few ms on this host
                try:
                    await quota.reserve()
                    break
                except QuotaExhausted:
                    await asyncio.sleep(0.05)
            assert await quota.remaining() == 1
            keys = {k.decode() for k in await client.keys(f"{key_prefix}:quota:day:*")}
            (new_key,) = keys - first_day
            (old_key,) = first_day
            old_date = dt.date.fromisoformat(old_key.rsplit(":", 1)[1])
            assert new_key.endswith((old_date + dt.timedelta(days=1)).isoformat())
        finally:
            await client.aclose()

    asyncio.run(body())


def test_lua_calendar_agrees_with_python_across_centuries(redis_url: str, key_prefix: str) -> None:
    """The day key is built in Lua from Redis TIME; check its date arithmetic against Python's for
    dates from 1901 to 2399 (leap years, centuries, 2000, month ends)."""
    targets = [dt.date(1901, 1, 1), dt.date(2000, 2, 29), dt.date(2100, 2, 28), dt.date(2100, 3, 1)]
    targets += [dt.date(y, m, d) for y in (1970, 2024, 2025, 2399) for m, d in ((2, 28), (12, 31))]
    targets += [dt.date(1950, 1, 1) + dt.timedelta(days=97 * i) for i in range(600)]

    async def body() -> None:
        client = Redis.from_url(redis_url)
        try:
            backend = RedisBackend(client)
            today = (await client.time())[0] // DAY_S
            for target in targets:
                day = (target - dt.date(1970, 1, 1)).days
                offset = (day - today) * DAY_S  # any offset: the backend does not limit it
                state = await backend.quota_peek(f"{key_prefix}:q", "day", offset)
                assert state.resets_at_s is not None
                expected = window_key(f"{key_prefix}:q", "day", state.resets_at_s - 1, offset)
                assert (state.window_key, state.resets_at_s) == (expected.key, expected.resets_at_s)
        finally:
            await client.aclose()

    asyncio.run(body())


def test_redis_limiter_uses_redis_time_not_the_hosts(redis_url: str, key_prefix: str) -> None:
    """The TAT the script stores is on Redis's clock (microseconds of TIME), whatever this host's
    clock says; booked slots are reported relative to it."""

    async def body() -> None:
        client = Redis.from_url(redis_url)
        try:
            limiter = RateLimiter(RedisBackend(client), f"{key_prefix}:rate", 10)
            await limiter.acquire()
            sec, usec = await client.time()
            tat = int(await client.get(limiter.key))
            assert 0 < tat - (sec * 1_000_000 + usec) <= 100_000
        finally:
            await client.aclose()

    asyncio.run(body())


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_call_abandoned_across_midnight_frees_its_own_days_call(
    kind: str, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    """Issue 19, scenario 11. Two admissions through one gate straddle the end of the quota day;
    the one taken before midnight misses its send deadline afterwards and is abandoned: its call
    goes back to the day it was counted in, and the new day keeps the call really sent in it."""
    sec, _usec = redis_client.time()
    offset = DAY_S - sec % DAY_S - 2  # this quota day ends 1-2 s from Redis's now
    midnight = sec + 2
    wall = FakeClock(midnight - 0.5)
    keys = Keys(key_prefix)

    async def body() -> dict[str, int]:
        client = Redis.from_url(redis_url)
        try:
            backend = MemoryBackend(wall_clock=wall) if kind == "memory" else RedisBackend(client)
            quota = CallQuota(backend, keys.quota("acct"), 10, "day", utc_offset_s=offset)
            gate = Gate(
                fleet=FleetControl(client, keys, "acct"),
                breaker=CircuitBreaker(client, keys, "acct"),
                limiter=RateLimiter(backend, keys.rate("acct"), 0),
                quota=quota,
            )
            before = await gate.admit()
            if kind == "memory":
                wall.now = midnight + 0.01
            else:
                await asyncio.sleep(max(0.0, midnight - time.time()) + 0.05)
            while (await quota.used()) != 0:  # the host's clock may trail Redis's by a few ms
                await asyncio.sleep(0.02)
            await gate.admit()  # the new day's call, sent
            await gate.abandon(before)  # sent nothing: frees a call on the day it was counted
            if kind == "memory":
                return dict(backend._counts)  # type: ignore[union-attr]
            found = await client.keys(f"{keys.quota('acct')}:day:*")
            return {k.decode(): int(await client.get(k)) for k in found}
        finally:
            await client.aclose()

    counts = asyncio.run(body())
    old_day = window_key(keys.quota("acct"), "day", midnight - 0.5, offset).key
    new_day = window_key(keys.quota("acct"), "day", midnight + 0.5, offset).key
    assert counts == {old_day: 0, new_day: 1}
