"""The rate limiter and the call quota, each test run against both backends (memory and Redis).

Admissions are checked two ways: the granted *slots* (the schedule, on the backend's clock) must
obey ``qps * t + burst`` exactly; the moments ``acquire`` actually returned (this host's clock)
must obey it within ``SLACK_S``, the event loop's wake-up jitter on a busy two-core machine.
"""

from __future__ import annotations

import asyncio
import gc
import time

import pytest
from test_ratelimit_support import BackendRunner, Recording, run_backend, window_excess

from workers.config import Settings
from workers.errors import ConfigError, QuotaExhausted
from workers.keys import Keys, account_tag
from workers.ratelimit import (
    Backend,
    CallQuota,
    MemoryBackend,
    RateLimiter,
    RedisBackend,
    from_settings,
)
from workers.ratelimit.adapt import Reaction
from workers.ratelimit.gcra import PPM

__all__ = ["run_backend"]  # the fixture, parametrized over both backends

SLACK_S = 0.025
# A throttle halves the rate and it stays so for the test (climbs back by 1.0 in an hour).
HALVED = Reaction(lone_decrease=0.5, climb_s=3600.0)


async def _hammer(limiter: RateLimiter, tasks: int, duration_s: float) -> list[float]:
    """``tasks`` callers acquiring back to back for ``duration_s``; the moments they got through."""
    times: list[float] = []
    deadline = time.monotonic() + duration_s

    async def caller() -> None:
        while time.monotonic() < deadline:
            await limiter.acquire()
            times.append(time.monotonic())

    # A collection of the whole suite's heap stalls the loop, and slots go by unbooked: the
    # rate check below is about the limiter, not about this process's garbage.
    gc.disable()
    try:
        await asyncio.gather(*(caller() for _ in range(tasks)))
    finally:
        gc.enable()
    return times


def _slots(recording: Recording) -> list[float]:
    """Granted slots, seconds after the first (exact: microseconds are subtracted as integers)."""
    first = min(g.slot_us for g in recording.grants)
    return [(g.slot_us - first) / PPM for g in recording.grants]


def _rate(times: list[float]) -> float:
    """Admissions per second between the first and the last."""
    return (len(times) - 1) / (max(times) - min(times))


# -- rate limiter ----------------------------------------------------------------------------------


def test_many_concurrent_callers_never_exceed_the_limit(
    run_backend: BackendRunner, key_prefix: str
) -> None:
    qps, duration = 200.0, 1.0

    async def body(backend: Backend) -> None:
        rec = Recording(backend)
        limiter = RateLimiter(rec, f"{key_prefix}:rate", qps)  # type: ignore[arg-type]
        times = await _hammer(limiter, 20, duration)
        assert window_excess(_slots(rec), qps, 1) <= 1e-9
        assert window_excess(times, qps, 1, SLACK_S) <= 0
        assert 0.9 * qps <= _rate(times) <= qps * 1.02
        assert rec.calls["gcra_reserve"] == len(times)  # one backend step per admission

    run_backend(body)


def test_burst_goes_at_once_then_the_rate_holds(run_backend: BackendRunner, key_prefix: str) -> None:
    qps, burst = 100.0, 5

    async def body(backend: Backend) -> None:
        rec = Recording(backend)
        limiter = RateLimiter(rec, f"{key_prefix}:rate", qps, burst)  # type: ignore[arg-type]
        start = time.monotonic()
        times = []
        for _ in range(15):
            await limiter.acquire()
            times.append(time.monotonic() - start)
        assert times[burst - 1] < 0.05  # the first five without waiting
        assert times[-1] >= (15 - burst) / qps - 0.002
        assert window_excess(_slots(rec), qps, burst) <= 1e-9

    run_backend(body)


def test_two_keys_are_independent(run_backend: BackendRunner, key_prefix: str) -> None:
    qps = 100.0

    async def body(backend: Backend) -> None:
        a = RateLimiter(backend, f"{key_prefix}:rate:a", qps, reaction=HALVED)
        b = RateLimiter(backend, f"{key_prefix}:rate:b", qps, reaction=HALVED)
        await b.on_throttled()  # only b slows down
        ta, tb = await asyncio.gather(_hammer(a, 5, 0.6), _hammer(b, 5, 0.6))
        assert _rate(ta) == pytest.approx(qps, rel=0.1)
        assert _rate(tb) == pytest.approx(qps * 0.5, rel=0.1)
        assert await a.effective_qps() == qps

    run_backend(body)


def test_waiters_of_one_process_are_served_in_arrival_order(
    run_backend: BackendRunner, key_prefix: str
) -> None:
    async def body(backend: Backend) -> None:
        limiter = RateLimiter(backend, f"{key_prefix}:rate", 200)
        order: list[int] = []

        async def caller(i: int) -> None:
            await limiter.acquire()
            order.append(i)

        tasks = []
        for i in range(12):
            tasks.append(asyncio.create_task(caller(i)))
            await asyncio.sleep(0)  # let it queue before the next arrives
        await asyncio.gather(*tasks)
        assert order == list(range(12))

    run_backend(body)


def test_qps_zero_means_unlimited_and_touches_nothing(
    run_backend: BackendRunner, key_prefix: str
) -> None:
    async def body(backend: Backend) -> None:
        rec = Recording(backend)
        limiter = RateLimiter(rec, f"{key_prefix}:rate", 0)  # type: ignore[arg-type]
        start = time.monotonic()
        for _ in range(1000):
            await limiter.acquire()
        await limiter.on_throttled()
        await limiter.on_success()
        assert time.monotonic() - start < 0.5
        assert sum(rec.calls.values()) == 0

    run_backend(body)


# -- adaptive back-off -----------------------------------------------------------------------------


def test_a_throttle_slows_every_worker_of_the_key(run_backend: BackendRunner, key_prefix: str) -> None:
    qps = 200.0

    async def body(backend: Backend) -> None:
        rec = Recording(backend)
        key = f"{key_prefix}:rate"
        limiter = RateLimiter(rec, key, qps, reaction=HALVED)  # type: ignore[arg-type]
        other_worker = RateLimiter(backend, key, qps, reaction=HALVED)  # same key: same limit
        await other_worker.on_throttled()
        assert await limiter.effective_qps() == pytest.approx(qps / 2, rel=0.001)
        times = await _hammer(limiter, 10, 0.6)
        assert _rate(times) == pytest.approx(qps / 2, rel=0.1)
        assert window_excess(_slots(rec), qps / 2, 1) <= 0.01

    run_backend(body)


def test_throttles_in_one_moment_count_once_and_never_go_below_the_floor(
    run_backend: BackendRunner, key_prefix: str
) -> None:
    async def body(backend: Backend) -> None:
        held = RateLimiter(backend, f"{key_prefix}:rate:held", 10)
        await asyncio.gather(*(held.on_throttled() for _ in range(10)))
        assert (await held.state()).factor_ppm == pytest.approx(950_000, abs=3_000)  # one lone dip

        deep = Reaction(decrease=0.5, knee=0.5, floor=0.2, hold_s=0)
        floored = RateLimiter(backend, f"{key_prefix}:rate:floor", 10, reaction=deep)
        for _ in range(10):
            await floored.on_throttled()
        assert (await floored.state()).factor_ppm == pytest.approx(200_000, abs=100)

        # With slots booked 1 s ahead, throttles stay one event until those slots have passed.
        booked = RateLimiter(backend, f"{key_prefix}:rate:booked", 10, reaction=Reaction(hold_s=0))
        for _ in range(10):
            await backend.gcra_reserve(booked.key, booked.adapt_key, booked.rate)
        await booked.on_throttled()
        await asyncio.sleep(0.05)
        await booked.on_throttled()
        assert (await booked.state()).factor_ppm == pytest.approx(952_500, abs=3_000)

    run_backend(body)


def test_the_rate_recovers_with_time_and_success_costs_nothing(
    run_backend: BackendRunner, key_prefix: str
) -> None:
    async def body(backend: Backend) -> None:
        rec = Recording(backend)
        quick = Reaction(lone_decrease=0.5, climb_s=1.0)  # back from 0.5 in half a second
        limiter = RateLimiter(rec, f"{key_prefix}:rate", 100, reaction=quick)  # type: ignore[arg-type]
        await limiter.on_throttled()
        before = sum(rec.calls.values())
        for _ in range(100):
            await limiter.on_success()
        assert sum(rec.calls.values()) == before  # no round trip per success
        await asyncio.sleep(0.2)
        factor = (await limiter.state()).factor_ppm / PPM
        assert 0.65 <= factor <= 0.85  # 0.5 + 0.2 s / 1 s, give or take the machine
        await asyncio.sleep(0.4)
        await limiter.acquire()
        assert await limiter.effective_qps() == 100  # recovered in full
        if isinstance(backend, RedisBackend):  # the state is kept a while for its score, then goes
            assert 0 < await backend.client.pttl(limiter.adapt_key) <= 140_000

    run_backend(body)


# -- cancellation ----------------------------------------------------------------------------------


def test_a_cancelled_sleeper_gives_its_slot_back(run_backend: BackendRunner, key_prefix: str) -> None:
    async def body(backend: Backend) -> None:
        limiter = RateLimiter(backend, f"{key_prefix}:rate", 10)  # one slot per 100 ms
        await limiter.acquire()
        start = time.monotonic()
        sleeper = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0.02)
        sleeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeper
        await asyncio.sleep(0.01)  # the give-back runs in the background
        await limiter.acquire()  # takes the returned slot, not the one after it
        assert time.monotonic() - start < 0.15

    run_backend(body)


def test_cancelled_while_the_reservation_is_in_flight(
    run_backend: BackendRunner, key_prefix: str
) -> None:
    async def body(backend: Backend) -> None:
        limiter = RateLimiter(backend, f"{key_prefix}:rate", 2)  # one slot per 500 ms
        await limiter.acquire()
        waiter = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0)  # it has sent its reservation and awaits the answer
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        for _ in range(50):
            await asyncio.sleep(0.01)
            if not limiter._background:
                break
        state = await limiter.state()
        assert state.booked_ahead_us <= 500_000  # only the first caller's slot is booked

    run_backend(body)


def test_cancelling_some_queued_waiters_admits_the_rest_within_the_limit(
    run_backend: BackendRunner, key_prefix: str
) -> None:
    qps = 100.0

    async def body(backend: Backend) -> None:
        rec = Recording(backend)
        limiter = RateLimiter(rec, f"{key_prefix}:rate", qps)  # type: ignore[arg-type]
        admitted: list[float] = []

        async def caller() -> None:
            await limiter.acquire()
            admitted.append(time.monotonic())

        tasks = [asyncio.create_task(caller()) for _ in range(30)]
        await asyncio.sleep(0.055)
        for task in tasks[10::2]:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
        assert cancelled == 10 and len(admitted) == 20
        assert window_excess(admitted, qps, 1, SLACK_S) <= 0

    run_backend(body)


# -- call quota ------------------------------------------------------------------------------------


def test_racing_callers_get_exactly_the_quota(run_backend: BackendRunner, key_prefix: str) -> None:
    async def body(backend: Backend) -> None:
        quota = CallQuota(backend, f"{key_prefix}:quota", 37, "day")

        async def caller() -> int:
            got = 0
            while True:
                try:
                    await quota.reserve()
                except QuotaExhausted:
                    return got
                got += 1
                await asyncio.sleep(0)

        counts = await asyncio.gather(*(caller() for _ in range(20)))
        assert sum(counts) == 37
        assert await quota.remaining() == 0 and await quota.used() == 37

    run_backend(body)


def test_release_gives_a_call_back_but_never_below_zero(
    run_backend: BackendRunner, key_prefix: str
) -> None:
    async def body(backend: Backend) -> None:
        quota = CallQuota(backend, f"{key_prefix}:quota", 3, "total")
        window = (await backend.quota_peek(quota.key_prefix, "total", 0)).window_key
        await quota.release(window)  # nothing reserved yet: stays at zero
        assert await quota.remaining() == 3
        reserved = [await quota.reserve() for _ in range(3)]
        assert reserved == [window] * 3
        with pytest.raises(QuotaExhausted):
            await quota.reserve()
        await quota.release(reserved[0])
        await quota.release(None)  # reserved without a quota: nothing to give back
        assert await quota.remaining() == 1
        await quota.reserve()
        with pytest.raises(QuotaExhausted) as info:
            await quota.reserve()
        assert "3 of 3 calls used in total" in str(info.value)
        assert "never resets" in str(info.value)
        assert info.value.window == "total" and info.value.resets_at_s is None
        assert info.value.limit == 3

    run_backend(body)


def test_exhausted_day_quota_says_when_it_resets(run_backend: BackendRunner, key_prefix: str) -> None:
    async def body(backend: Backend) -> None:
        quota = CallQuota(backend, f"{key_prefix}:quota", 0, "day")
        with pytest.raises(QuotaExhausted) as info:
            await quota.reserve()
        exc = info.value
        assert exc.state == "quota_exhausted" and exc.window == "day"
        assert exc.resets_at_s is not None and exc.resets_at_s % 86_400 == 0
        assert 0 < exc.resets_at_s - time.time() <= 86_400 + 5
        assert "0 of 0 calls used on " in str(exc) and "(UTC day)" in str(exc)
        assert time.strftime("%Y-%m-%dT00:00:00Z", time.gmtime(exc.resets_at_s)) in str(exc)

    run_backend(body)


def test_no_quota_means_no_counting(run_backend: BackendRunner, key_prefix: str) -> None:
    async def body(backend: Backend) -> None:
        rec = Recording(backend)
        quota = CallQuota(rec, f"{key_prefix}:quota", None, "day")  # type: ignore[arg-type]
        for _ in range(100):
            assert await quota.reserve() is None
        await quota.release(None)
        assert await quota.remaining() is None and await quota.used() == 0
        assert sum(rec.calls.values()) == 0

    run_backend(body)


def test_from_settings_keys_the_limit_by_account(
    run_backend: BackendRunner, key_prefix: str
) -> None:
    settings = Settings(
        access_key_id="LTAI-test-account", key_prefix=key_prefix, qps=50, burst=2, quota=5,
        quota_window="total",
    )

    async def body(backend: Backend) -> None:
        redis = backend.client if isinstance(backend, RedisBackend) else None
        limiter, quota = from_settings(settings, redis)
        assert isinstance(limiter.backend, RedisBackend if redis else MemoryBackend)
        assert limiter.backend is quota.backend
        keys, tag = Keys(key_prefix), account_tag("LTAI-test-account")
        assert limiter.key == keys.rate(tag) and limiter.adapt_key == keys.rate_adapt(tag)
        assert quota.key_prefix == keys.quota(tag)
        assert (limiter.rate.qps, limiter.rate.burst) == (50, 2)
        assert (quota.limit, quota.window) == (5, "total")
        await limiter.acquire()
        await quota.reserve()
        if redis is not None:
            assert await redis.exists(keys.rate(tag))
            assert int(await redis.get(keys.quota(tag, "total"))) == 1
        with pytest.raises(ConfigError, match="ALIBABA_CLOUD_ACCESS_KEY_ID"):
            from_settings(settings.with_(access_key_id=None), redis)

    run_backend(body)


def test_a_counter_that_lost_its_last_writes_is_raised_to_what_a_worker_saw(
    run_backend: BackendRunner, key_prefix: str
) -> None:
    """Redis crashed and its AOF lost the last second of increments: the next reservation of a
    worker that counted them restores the count first, so the quota is never overrun."""

    async def body(backend: Backend) -> tuple[int, int, bool]:
        seen_it = CallQuota(backend, f"{key_prefix}:quota", 8, "total")
        for _ in range(6):
            await seen_it.reserve()
        key = f"{key_prefix}:quota:total"
        if isinstance(backend, MemoryBackend):
            backend._counts[key] = 2
        else:
            await backend.client.set(key, 2)
        backend.outages += 1  # what the crash looked like from here: a connection error
        await seen_it.reserve()  # 6 seen, so 7 now, not 3
        other = CallQuota(backend, f"{key_prefix}:quota", 8, "total")
        await other.reserve()  # 8
        try:
            await other.reserve()
        except QuotaExhausted:
            exhausted = True
        else:
            exhausted = False
        return await seen_it.used(), await other.used(), exhausted

    assert run_backend(body) == (8, 8, True)
