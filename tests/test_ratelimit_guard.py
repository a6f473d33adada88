"""Robustness to delivery lateness: the pacing guard, the late re-book, the setting, the warm-up.

A call reaches the service a little after its slot (event-loop wake-up, the first request's lazy
imports). With slots exactly ``1/Q`` apart, one such call crossing a whole-second boundary makes
``Q + 1`` in the service's second. The guard paces ``Q`` per ``1 s + guard`` so a call may be up to
the guard late; a waiter woken later than ``late_s`` gives its slot back (when nobody booked
after it) and books a new one instead of sending; a request held up after admission past its
slot's ``send_by`` is not sent either (``tests/test_send_deadline.py`` runs that end to end).
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import logging
import math
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import pytest
from test_ratelimit_clock import FakeClock
from test_ratelimit_support import BackendRunner, Recording, run_backend

from workers.config import Settings
from workers.errors import ConfigError
from workers.ratelimit import Backend, MemoryBackend, RateLimiter, from_settings
from workers.ratelimit.gcra import PPM, Grant, Rate
from workers.ratelimit.limiter import (
    MAX_REBOOKS,
    SEND_MARGIN_S,
    default_late_s,
    default_send_late_s,
)

__all__ = ["run_backend"]  # the fixture, parametrized over both backends


def _max_in_any_second(times_us: Sequence[int]) -> int:
    """The most ``times_us`` (sorted, integer microseconds) in any half-open ``[t, t + 1 s)``:
    whole seconds, which the service counts, included."""
    return max(
        (bisect.bisect_left(times_us, t + PPM) - i for i, t in enumerate(times_us)), default=0
    )


def _simulate(
    guard_s: float, late_us: int, qps: int = 10, callers: int = 4, calls: int = 600, seed: int = 3
) -> list[int]:
    """``callers`` workers sharing one limit on the memory backend and an injected clock. Each
    reserves a slot, delivers its call ``0..late_us`` after it (mostly on time, often as late as
    allowed: the worst case for a window), and comes back after a random think time (sometimes
    long, so slots are also granted at once on an idle limit). Returns delivery times, µs."""
    rng = random.Random(seed)
    clock = FakeClock(1000.0)
    backend = MemoryBackend(clock=clock)
    limiter = RateLimiter(backend, "sim:rate", qps, guard_s=guard_s)

    async def run() -> list[int]:
        arrivals = [(round(clock.now * PPM) + rng.randrange(50_000), c) for c in range(callers)]
        heapq.heapify(arrivals)
        delivered: list[int] = []
        while len(delivered) < calls:
            at_us, caller = heapq.heappop(arrivals)
            clock.now = at_us / PPM
            grant = await backend.gcra_reserve(limiter.key, limiter.adapt_key, limiter.rate)
            delay = rng.choice((0, late_us, late_us, rng.randrange(late_us + 1)))
            delivered.append(grant.slot_us + delay)
            think = rng.choice((0, 1_000, 30_000, 2_000_000))
            heapq.heappush(arrivals, (grant.slot_us + delay + think, caller))
        return sorted(delivered)

    return asyncio.run(run())


# -- A: the pacing guard ---------------------------------------------------------------------------


def test_guard_widens_the_interval_and_is_validated() -> None:
    assert Rate(10).interval_us == 100_000  # the algorithm's default: no guard, exact
    assert Rate(10, guard_s=0.010).interval_us == 101_000
    assert Rate(50, guard_s=0.010).interval_us == 20_200
    assert Rate(3, guard_s=0.010).interval_us == 336_667  # rounded up: never faster
    assert Rate(10, burst=3, guard_s=0.5).interval_us == 150_000
    for bad in (-0.001, 1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="guard_s"):
            Rate(10, guard_s=bad)
    limiter = RateLimiter(MemoryBackend(), "k", 10, guard_s=0.010)
    # default: the send deadline's allowance, the guard less 2 ms, never below half the guard
    assert round(SEND_MARGIN_S * 1000, 9) == 2
    assert limiter.late_s == pytest.approx(0.008) == limiter.send_late_s
    assert default_late_s(0.020) == pytest.approx(0.018)
    assert default_late_s(0.003) == pytest.approx(0.0015)  # guard < 2 x margin: half of it
    assert default_late_s(0.0) == 0
    assert RateLimiter(MemoryBackend(), "k", 10).late_s == 0  # no guard: no re-book
    assert RateLimiter(MemoryBackend(), "k", 10, guard_s=0.01, late_s=0).late_s == 0
    with pytest.raises(ConfigError, match="late_s"):
        RateLimiter(MemoryBackend(), "k", 10, guard_s=0.01, late_s=-1)


@pytest.mark.parametrize("qps", [10, 50])
def test_calls_up_to_the_guard_late_never_make_q_plus_one_in_a_second(qps: int) -> None:
    guard_s = 0.010
    delivered = _simulate(
        guard_s, late_us=round(guard_s * PPM) - 1, qps=qps, callers=qps, calls=60 * qps
    )
    assert len(delivered) == 60 * qps
    assert _max_in_any_second(delivered) == qps  # the limit, reached and never passed
    # The schedule itself is Q per 1.01 s (99.0 % of Q), give or take one call's lateness.
    assert delivered[-1] - delivered[0] >= (len(delivered) - 1) * 1.01 * PPM / qps - guard_s * PPM


def test_without_the_guard_the_same_lateness_makes_q_plus_one() -> None:
    """The failure the guard prevents: slots exactly 1/Q apart, calls a few ms late."""
    delivered = _simulate(0.0, late_us=9_999)
    assert _max_in_any_second(delivered) == 11
    # ...and a guard smaller than the lateness does not hold either.
    assert _max_in_any_second(_simulate(0.005, late_us=9_999)) == 11


def test_a_guard_keeps_a_burst_to_q_plus_burst_minus_one() -> None:
    clock = FakeClock(50.0)
    backend = MemoryBackend(clock=clock)
    rate = Rate(10, burst=3, guard_s=0.01)

    async def run() -> list[int]:
        slots = []
        for _ in range(40):  # all callers arrive at once: the burst, then pacing
            grant = await backend.gcra_reserve("b:rate", "b:rate:adapt", rate)
            slots.append(grant.slot_us)
        return slots

    slots = asyncio.run(run())
    late = [s + (9_999 if i % 2 else 0) for i, s in enumerate(slots)]
    assert _max_in_any_second(sorted(late)) <= 10 + 3 - 1


# -- C: a slot woken too late is not used ----------------------------------------------------------


def test_a_late_wake_up_gives_the_slot_back_and_books_again(
    run_backend: BackendRunner, key_prefix: str
) -> None:
    """Nobody booked after the missed slot: it is given back, so the replacement is granted at
    once (the schedule is not pushed out by a slot) and still at least one interval after the
    previous call."""

    async def body(backend: Backend) -> None:
        rec = Recording(backend)
        limiter = RateLimiter(rec, f"{key_prefix}:rate", 10, guard_s=0.02)  # type: ignore[arg-type]
        await limiter.acquire()  # slot now; the next one is 102 ms later
        returned: list[float] = []

        async def caller() -> None:
            await limiter.acquire()
            returned.append(time.monotonic())

        task = asyncio.create_task(caller())
        await asyncio.sleep(0.03)
        time.sleep(0.15)  # the loop stalls past the slot: the waiter wakes ~80 ms late
        await task
        assert limiter.late_rebooks == 1 and limiter.late_returned == 1
        assert rec.calls["gcra_reserve"] == 3  # first caller, the late slot, its replacement
        assert rec.calls["gcra_give_back"] == 1
        first, late, used = rec.grants
        assert used.wait_s == 0  # the slot's place was free again: granted at once
        assert late.slot_us < used.slot_us < late.slot_us + limiter.rate.interval_us
        assert used.slot_us >= first.slot_us + limiter.rate.interval_us
        if isinstance(backend, MemoryBackend):  # the same monotonic clock: compare exactly
            assert returned[0] >= used.slot_us / PPM - 0.002
        # The schedule goes on from the replacement: the next slot is one interval after it.
        assert (await limiter.state()).booked_ahead_us > 0.09 * PPM

    run_backend(body)


def test_a_late_slot_booked_after_is_lost_and_the_waiter_books_the_next(
    run_backend: BackendRunner, key_prefix: str
) -> None:
    """Another process booked after the missed slot: it cannot be given back (that would let two
    calls share a slot), so it stays unused and the waiter books after the other's slot."""

    async def body(backend: Backend) -> None:
        rec = Recording(backend)
        limiter = RateLimiter(rec, f"{key_prefix}:rate", 10, guard_s=0.02)  # type: ignore[arg-type]
        await limiter.acquire()
        task = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0.03)  # the waiter holds the slot at ~102 ms
        other = await backend.gcra_reserve(limiter.key, limiter.adapt_key, limiter.rate)  # ~204
        time.sleep(0.15)
        await task
        assert limiter.late_rebooks == 1 and limiter.late_returned == 0
        late, used = rec.grants[1], rec.grants[2]
        assert other.slot_us >= late.slot_us + limiter.rate.interval_us
        assert used.slot_us >= other.slot_us + limiter.rate.interval_us

    run_backend(body)


class _SlowOutbound:
    """A backend whose requests take ``delay_s`` to reach it (the answers come back at once)."""

    def __init__(self, inner: Backend, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s

    async def gcra_reserve(self, key: str, adapt_key: str, rate: Rate) -> Grant:
        await asyncio.sleep(self.delay_s)
        return await self.inner.gcra_reserve(key, adapt_key, rate)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_the_reservation_round_trip_is_not_counted_as_lateness(key_prefix: str) -> None:
    """Lateness runs from when the answer arrived: a slow trip *to* the backend (30 ms here, far
    above ``late_s``) does not make a waiter woken on time give its slot up."""

    async def body() -> None:
        limiter = RateLimiter(
            _SlowOutbound(MemoryBackend(), 0.03), f"{key_prefix}:rate", 10, guard_s=0.02  # type: ignore[arg-type]
        )
        assert limiter.late_s < 0.03
        for _ in range(3):  # granted at once, then twice after a ~102 ms sleep
            await limiter.acquire()
        assert limiter.late_rebooks == 0

    asyncio.run(body())


def test_without_a_guard_a_late_waiter_still_sends(
    run_backend: BackendRunner, key_prefix: str
) -> None:
    async def body(backend: Backend) -> None:
        rec = Recording(backend)
        limiter = RateLimiter(rec, f"{key_prefix}:rate", 10)  # type: ignore[arg-type]
        await limiter.acquire()
        task = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0.03)
        time.sleep(0.15)
        await task
        assert limiter.late_rebooks == 0 and rec.calls["gcra_reserve"] == 2

    run_backend(body)


def test_a_cancelled_re_booker_gives_its_new_slot_back(
    run_backend: BackendRunner, key_prefix: str
) -> None:
    async def body(backend: Backend) -> None:
        limiter = RateLimiter(backend, f"{key_prefix}:rate", 10, guard_s=0.02)
        await limiter.acquire()
        start = time.monotonic()
        sleeper = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0.03)  # the sleeper holds ~102 ms; someone else books ~204 ms
        await backend.gcra_reserve(limiter.key, limiter.adapt_key, limiter.rate)
        time.sleep(0.15)  # the sleeper wakes late, cannot give back, books ~306 ms and sleeps
        await asyncio.sleep(0.005)
        sleeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeper
        await asyncio.sleep(0.02)  # the give-back runs in the background
        assert limiter.late_rebooks == 1 and limiter.late_returned == 0
        await limiter.acquire()  # takes the returned slot (~306 ms), not the one after (~408)
        assert time.monotonic() - start < 0.38

    run_backend(body)


def test_a_waiter_late_every_time_sends_after_max_rebooks(
    key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        rec = Recording(MemoryBackend())
        # Any lateness at all counts: every wake-up is "late", as on a hopelessly busy loop.
        limiter = RateLimiter(rec, f"{key_prefix}:rate", 1000, guard_s=0.01, late_s=1e-9)  # type: ignore[arg-type]
        await limiter.acquire()
        assert limiter.late_rebooks == MAX_REBOOKS
        assert rec.calls["gcra_reserve"] == MAX_REBOOKS + 1

    with caplog.at_level(logging.WARNING, logger="workers.ratelimit.limiter"):
        asyncio.run(body())
    assert "sending anyway" in caplog.text


# -- D: a request held up after admission is not sent ---------------------------------------------


def test_the_slot_carries_its_send_deadline(run_backend: BackendRunner, key_prefix: str) -> None:
    """``send_by`` is the slot plus ``send_late_s`` (the guard less what the write and the trip
    take), on the loop's clock; no guard, no limit: no deadline."""
    assert default_send_late_s(0.010) == pytest.approx(0.010 - SEND_MARGIN_S)
    assert default_send_late_s(0.002) == pytest.approx(0.001)  # never under half the guard
    assert default_send_late_s(0.0) == math.inf

    async def body(backend: Backend) -> None:
        limiter = RateLimiter(backend, f"{key_prefix}:rate", 10, guard_s=0.01)
        loop = asyncio.get_running_loop()
        await limiter.acquire()
        before = loop.time()
        slot = await limiter.acquire()  # ~101 ms later
        woke = loop.time()
        assert slot.grant is not None
        assert before + 0.09 < slot.send_by - limiter.send_late_s <= woke
        unguarded = RateLimiter(backend, f"{key_prefix}:rate2", 10)
        assert (await unguarded.acquire()).send_by == math.inf
        assert (await RateLimiter(backend, f"{key_prefix}:rate3", 0).acquire()).send_by == math.inf

    run_backend(body)


def test_an_abandoned_slot_is_given_back_unless_booked_after(
    run_backend: BackendRunner, key_prefix: str
) -> None:
    async def body(backend: Backend) -> None:
        limiter = RateLimiter(backend, f"{key_prefix}:rate", 10, guard_s=0.01)
        slot = await limiter.acquire()
        await limiter.abandon(slot)  # nobody booked after it: the next caller takes its place
        assert (limiter.abandoned, limiter.abandoned_returned) == (1, 1)
        start = time.monotonic()
        again = await limiter.acquire()
        assert time.monotonic() - start < 0.05
        await backend.gcra_reserve(limiter.key, limiter.adapt_key, limiter.rate)  # someone else
        await limiter.abandon(again)  # booked after: lost (two calls must not share a slot)
        assert (limiter.abandoned, limiter.abandoned_returned) == (2, 1)

    run_backend(body)


# -- the setting -----------------------------------------------------------------------------------


def test_rate_guard_setting_reaches_the_limiter() -> None:
    assert Settings().rate_guard_ms == 10.0
    env = {"ALIBABA_CLOUD_ACCESS_KEY_ID": "LTAI-guard", "CARNUMBER_RATE_GUARD_MS": "2.5"}
    settings = Settings.from_env(env)
    assert settings.rate_guard_ms == 2.5
    limiter, _ = from_settings(settings, None)
    assert limiter.rate.guard_s == pytest.approx(0.0025)
    assert limiter.late_s == pytest.approx(0.00125)
    assert limiter.rate.interval_us == 100_250  # 10 qps: 1.0025 s / 10
    off, _ = from_settings(settings.with_(rate_guard_ms=0), None)
    assert off.rate.interval_us == 100_000 and off.late_s == 0
    for bad in ("-1", "1000", "nan"):
        with pytest.raises(ConfigError, match="CARNUMBER_RATE_GUARD_MS"):
            Settings.from_env({**env, "CARNUMBER_RATE_GUARD_MS": bad})
    with pytest.raises(ConfigError, match="CARNUMBER_RATE_GUARD_MS='ten': must be a number"):
        Settings.from_env({**env, "CARNUMBER_RATE_GUARD_MS": "ten"})


# -- B: warm-up --------------------------------------------------------------------------------------

_WARM_UP_CHECK = """
import gc, sys, threading
import workers.tasks  # what a worker has imported when worker_init fires
from celery import signals
from workers.tasks import _warm_up
assert _warm_up in signals.worker_init._live_receivers(None)
lazy = ("httpcore", "anyio._backends._asyncio", "pandas")  # pandas: Table.from_pylist's import
assert not any(m in sys.modules for m in lazy), [m for m in lazy if m in sys.modules]
_warm_up()
assert all(m in sys.modules for m in lazy), [m for m in lazy if m not in sys.modules]
assert threading.active_count() == 1  # nothing left running to trip up a fork
assert gc.get_freeze_count() > 10_000  # start-up objects out of the collector's reach
print("ok")
"""


def test_warm_up_loads_what_the_first_request_would_load_lazily() -> None:
    """In a fresh interpreter (this one has loaded everything already): what the worker_init
    hook loads is what httpx's async path otherwise loads on the first client and request and the
    first Parquet part on its first write, and it freezes start-up objects so a full collection
    does not stall a worker's loop."""
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", _WARM_UP_CHECK],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
