"""The fleet stop flag and the circuit breaker, shared between clients through real Redis.

Every behaviour runs twice: over Redis (two separate connections play two workers) and over the
process-local twin (``redis=None``), which must behave the same.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from workers import fleet as fleet_module
from workers.errors import CircuitOpen, FleetStopped, Paused, RedisUnavailable
from workers.fleet import CircuitBreaker, FleetControl
from workers.keys import Keys

CACHE_S = 0.05
COOLDOWN_S = 0.25
ACCOUNT = "acct0123abcd"


class Store:
    """Hands out clients of one backend; each test body gets a fresh event loop."""

    def __init__(self, kind: str, url: str, prefix: str) -> None:
        self.kind = kind
        self.url = url
        self.keys = Keys(prefix)

    def run(self, body: Callable[[Callable[[], aredis.Redis | None]], Awaitable[None]]) -> None:
        async def main() -> None:
            opened: list[aredis.Redis] = []

            def client() -> aredis.Redis | None:
                if self.kind == "memory":
                    return None
                c = aredis.Redis.from_url(self.url)
                opened.append(c)
                return c

            try:
                await body(client)
            finally:
                for c in opened:
                    await c.aclose()

        asyncio.run(main())

    def fleet(self, client: aredis.Redis | None, **kw: Any) -> FleetControl:
        return FleetControl(client, self.keys, ACCOUNT, **{"cache_s": CACHE_S, **kw})

    def breaker(self, client: aredis.Redis | None, **kw: Any) -> CircuitBreaker:
        args: dict[str, Any] = {
            "window": 10,
            "min_calls": 5,
            "failure_ratio": 0.8,
            "cooldown_s": COOLDOWN_S,
            "cache_s": CACHE_S,
        }
        args.update(kw)
        return CircuitBreaker(client, self.keys, ACCOUNT, **args)


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest, redis_url: str, key_prefix: str) -> Iterator[Store]:
    yield Store(request.param, redis_url, key_prefix)
    for key in [k for k in fleet_module._MEMORY if k.startswith(key_prefix)]:
        fleet_module._MEMORY.pop(key, None)


async def passes(check: Callable[[], Awaitable[None]]) -> bool:
    try:
        await check()
    except (FleetStopped, CircuitOpen):
        return False
    return True


# -- fleet stop ---------------------------------------------------------------------------------


def test_a_stop_reaches_another_worker_within_the_cache_period(store: Store) -> None:
    async def body(client: Callable[[], aredis.Redis | None]) -> None:
        a, b = store.fleet(client()), store.fleet(client())
        await b.check()  # b now trusts "running" for CACHE_S
        await a.stop("InvalidAccessKeyId.NotFound", "the AccessKeyId does not exist", "run-1")
        started = time.monotonic()
        with pytest.raises(FleetStopped) as own:
            await a.check()  # the stopping worker halts at once
        assert own.value.code == "InvalidAccessKeyId.NotFound"
        while await passes(b.check):
            assert time.monotonic() - started < CACHE_S + 0.5
            await asyncio.sleep(0.005)
        with pytest.raises(FleetStopped) as seen:
            await b.check()
        assert seen.value.code == "InvalidAccessKeyId.NotFound"
        assert "does not exist" in str(seen.value)

    store.run(body)


def test_the_first_stop_wins_even_when_many_race(store: Store) -> None:
    async def body(client: Callable[[], aredis.Redis | None]) -> None:
        a, b = store.fleet(client()), store.fleet(client())
        await a.stop("Forbidden.RAM", "first", "run-1")
        await asyncio.gather(*(w.stop(f"Late.{i}", "later", "run-2") for i, w in enumerate([a, b] * 5)))
        status = await b.status()
        assert status is not None
        assert (status["code"], status["message"], status["run"]) == ("Forbidden.RAM", "first", "run-1")
        assert abs(status["at"] - time.time()) < 60
        with pytest.raises(FleetStopped) as seen:
            await b.check()  # b's own stop lost: it reports the winner
        assert seen.value.code == "Forbidden.RAM"

    store.run(body)


def test_clear_resumes_every_worker(store: Store) -> None:
    async def body(client: Callable[[], aredis.Redis | None]) -> None:
        a, b = store.fleet(client()), store.fleet(client())
        await a.stop("OcrServiceExpired", "expired", None)
        with pytest.raises(FleetStopped):
            await b.check()
        await b.clear()  # the operator, from anywhere
        assert await a.status() is None
        await b.check()
        await asyncio.sleep(CACHE_S * 1.5)
        await a.check()
        # A new stop after a resume is a new first stop.
        await b.stop("noPermission", "again", "run-3")
        status = await a.status()
        assert status is not None and (status["code"], status["run"]) == ("noPermission", "run-3")

    store.run(body)


def test_the_stop_message_is_stored_without_secrets(store: Store) -> None:
    async def body(client: Callable[[], aredis.Redis | None]) -> None:
        a = store.fleet(client())
        signed = "https://b.s3.amazonaws.com/k.jpg?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIAX"
        await a.stop("SignatureDoesNotMatch", f"while fetching {signed}", "run-1")
        status = await a.status()
        assert status is not None
        assert "deadbeef" not in status["message"] and "AKIAX" not in status["message"]
        assert "b.s3.amazonaws.com/k.jpg" in status["message"]

    store.run(body)


# -- circuit breaker ----------------------------------------------------------------------------


def test_circuit_opens_once_enough_recent_calls_failed_and_another_worker_sees_it(
    store: Store,
) -> None:
    async def body(client: Callable[[], aredis.Redis | None]) -> None:
        a, b = store.breaker(client()), store.breaker(client())
        await a.record(True)
        for _ in range(3):
            await a.record(False)
        await a.check()  # 3/4 failed, but fewer than min_calls=5 known
        await b.record(False)  # 4/5 = 0.8: opens
        with pytest.raises(CircuitOpen):
            await b.check()
        await asyncio.sleep(CACHE_S * 1.5)
        with pytest.raises(CircuitOpen):
            await a.check()
        status = await a.status()
        assert (status["state"], status["opens"]) == ("open", 1)

    store.run(body)


def test_circuit_stays_closed_while_most_calls_succeed_and_old_failures_slide_out(
    store: Store,
) -> None:
    async def body(client: Callable[[], aredis.Redis | None]) -> None:
        a = store.breaker(client(), min_calls=10)
        for _ in range(7):
            await a.record(False)
        for _ in range(10):
            await a.record(True)  # the window (10) now holds only successes
        assert (await a.status())["failures"] == 0
        for _ in range(7):
            await a.record(False)
        assert await passes(a.check)  # 7/10 < 0.8
        await a.record(False)  # 8/10
        assert (await a.status())["state"] == "open"

    store.run(body)


async def _open(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.min_calls):
        await breaker.record(False)
    with pytest.raises(CircuitOpen):
        await breaker.check()


def test_after_the_cooldown_exactly_one_probe_goes_through_fleet_wide_and_its_success_closes(
    store: Store,
) -> None:
    async def body(client: Callable[[], aredis.Redis | None]) -> None:
        a, b = store.breaker(client()), store.breaker(client())
        await _open(a)
        await a.record(True)  # an answer to a call admitted before it opened: ignored
        assert (await a.status())["state"] == "open"
        await asyncio.sleep(COOLDOWN_S + 0.02)
        results = await asyncio.gather(*(passes(w.check) for w in [a, b] * 6))
        assert sum(results) == 1  # one probe among 12 concurrent checks on two clients
        assert (await b.status())["state"] == "half_open"
        prober = [a, b][results.index(True) % 2]
        other = b if prober is a else a
        await prober.record(True)
        assert await passes(prober.check)
        await asyncio.sleep(CACHE_S * 1.5)
        assert await passes(other.check)
        assert (await other.status())["state"] == "closed"

    store.run(body)


def test_a_failed_probe_reopens_for_another_cooldown(store: Store) -> None:
    async def body(client: Callable[[], aredis.Redis | None]) -> None:
        a, b = store.breaker(client()), store.breaker(client())
        await _open(a)
        await asyncio.sleep(COOLDOWN_S + 0.02)
        await b.check()  # b is the probe
        await b.record(False)
        reopened = time.monotonic()
        with pytest.raises(CircuitOpen):
            await b.check()
        await asyncio.sleep(CACHE_S * 1.5)
        assert not await passes(a.check)
        assert (await a.status())["opens"] == 2
        while not await passes(a.check):  # the next probe, after a full cooldown
            await asyncio.sleep(0.01)
        assert time.monotonic() - reopened >= COOLDOWN_S - 0.02

    store.run(body)


def test_a_probe_that_never_reports_is_replaced_after_its_lease(store: Store) -> None:
    async def body(client: Callable[[], aredis.Redis | None]) -> None:
        a = store.breaker(client(), probe_timeout_s=0.1)
        b = store.breaker(client(), probe_timeout_s=0.1)
        await _open(a)
        await asyncio.sleep(COOLDOWN_S + 0.02)
        await a.check()  # the probe, whose worker then dies
        assert not await passes(b.check)
        await asyncio.sleep(0.12)
        await b.check()  # a new probe
        await b.record(True)
        assert (await a.status())["state"] == "closed"

    store.run(body)


def test_reset_closes_and_forgets(store: Store) -> None:
    async def body(client: Callable[[], aredis.Redis | None]) -> None:
        a = store.breaker(client())
        await _open(a)
        await a.reset()
        await a.check()
        assert await a.status() == {"state": "closed", "calls": 0, "failures": 0, "opens": 0}

    store.run(body)


def test_breaker_arguments_are_validated() -> None:
    keys = Keys("cntest:unused")
    for bad in (
        {"window": 0},
        {"min_calls": 0},
        {"window": 5, "min_calls": 6},
        {"failure_ratio": 0.0},
        {"failure_ratio": 1.5},
        {"cooldown_s": 0},
    ):
        with pytest.raises(ValueError):
            CircuitBreaker(None, keys, ACCOUNT, **bad)  # type: ignore[arg-type]


# -- without Redis ------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_redis_pauses_the_gate_instead_of_leaking_redis_errors() -> None:
    async def body() -> None:
        dead = aredis.Redis(
            host="127.0.0.1",
            port=_closed_port(),
            socket_connect_timeout=0.2,
            retry=Retry(NoBackoff(), 0),  # redis-py would otherwise retry for ~15 s
        )
        keys = Keys("cntest:dead")
        try:
            fleet, breaker = FleetControl(dead, keys, ACCOUNT), CircuitBreaker(dead, keys, ACCOUNT)
            for check in (fleet.check, breaker.check):
                with pytest.raises(Paused) as caught:
                    await check()
                assert type(caught.value) is RedisUnavailable and "Redis unreachable" in str(caught.value)
            await breaker.record(False)  # best effort: no exception
            with pytest.raises(Paused):
                await fleet.stop("Forbidden.RAM", "denied", None)
        finally:
            await dead.aclose()

    asyncio.run(body())


def test_stop_state_lives_in_the_configured_redis_key(
    redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    keys = Keys(key_prefix)

    async def body() -> None:
        c = aredis.Redis.from_url(redis_url)
        try:
            await FleetControl(c, keys, ACCOUNT).stop("noPermission", "denied", "run-9")
        finally:
            await c.aclose()

    asyncio.run(body())
    held = redis_client.hgetall(keys.stop(ACCOUNT))
    assert held[b"code"] == b"noPermission" and held[b"run"] == b"run-9"
    assert redis_client.ttl(keys.stop(ACCOUNT)) == -1  # stays until an operator clears it
