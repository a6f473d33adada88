"""The Redis backend on its own: several OS processes sharing one limit and one quota, script
cache flushes, a Redis restart, Redis going away, and the keys' lifetimes.

Run as a script, this file is one fleet worker process (see :func:`_worker`).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis

from workers.errors import Paused, QuotaExhausted
from workers.ratelimit import CallQuota, Grant, Rate, RateLimiter, RedisBackend

ROOT = Path(__file__).resolve().parents[1]


# -- several OS processes --------------------------------------------------------------------------


class _RecordingRedisBackend(RedisBackend):
    def __init__(self, client: Redis) -> None:
        super().__init__(client)
        self.slots: list[int] = []

    async def gcra_reserve(self, key: str, adapt_key: str, rate: Rate) -> Grant:
        grant = await super().gcra_reserve(key, adapt_key, rate)
        self.slots.append(grant.slot_us)
        return grant


async def _worker(url: str, prefix: str, qps: float, tasks: int, duration_s: float, limit: int) -> dict:
    """One fleet process: wait for the start signal, then ``tasks`` callers acquire for
    ``duration_s``, then race for a quota of ``limit``. Returns what it was granted."""
    client = Redis.from_url(url)
    try:
        backend = _RecordingRedisBackend(client)
        limiter = RateLimiter(backend, f"{prefix}:rate", qps)
        quota = CallQuota(backend, f"{prefix}:quota", limit, "total")
        await client.rpush(f"{prefix}:ready", os.getpid())
        if not await client.blpop([f"{prefix}:go"], timeout=60):
            raise SystemExit("no start signal")
        times: list[float] = []
        deadline = time.monotonic() + duration_s

        async def caller() -> None:
            while time.monotonic() < deadline:
                await limiter.acquire()
                times.append(time.monotonic())

        await asyncio.gather(*(caller() for _ in range(tasks)))

        async def reserver() -> int:
            got = 0
            while True:
                try:
                    await quota.reserve()
                except QuotaExhausted:
                    return got
                got += 1

        reserved = await asyncio.gather(*(reserver() for _ in range(tasks)))
        return {"times": times, "slots_us": backend.slots, "reserved": sum(reserved)}
    finally:
        await client.aclose()


def test_several_processes_share_one_limit_and_one_quota(
    redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    from test_ratelimit_support import window_excess

    procs, tasks, qps, duration, limit = 4, 5, 200.0, 1.2, 53
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = [redis_url, key_prefix, str(qps), str(tasks), str(duration), str(limit)]
    children = [
        subprocess.Popen(
            [sys.executable, __file__, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(procs)
    ]
    try:
        deadline = time.monotonic() + 60
        while redis_client.llen(f"{key_prefix}:ready") < procs:
            assert time.monotonic() < deadline, "fleet processes did not start"
            assert all(c.poll() is None for c in children), "a fleet process died"
            time.sleep(0.05)
        redis_client.rpush(f"{key_prefix}:go", *range(procs))
        results = [json.loads(c.communicate(timeout=60)[0]) for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
    assert all(c.returncode == 0 for c in children)

    times = [t for r in results for t in r["times"]]
    slots = sorted(s for r in results for s in r["slots_us"])
    assert all(len(r["times"]) > 0.15 * qps * duration for r in results)  # everyone got a share
    assert window_excess([(s - slots[0]) / 1e6 for s in slots], qps, 1) <= 1e-9
    assert window_excess(times, qps, 1, 0.025) <= 0
    achieved = (len(times) - 1) / (max(times) - min(times))
    assert 0.9 * qps <= achieved <= 1.02 * qps
    assert sum(r["reserved"] for r in results) == limit
    assert int(redis_client.get(f"{key_prefix}:quota:total")) == limit


# -- the script cache, restarts, outages -----------------------------------------------------------


def test_scripts_survive_script_flush(redis_url: str, key_prefix: str) -> None:
    async def body() -> None:
        client = Redis.from_url(redis_url)
        try:
            backend = RedisBackend(client)
            limiter = RateLimiter(backend, f"{key_prefix}:rate", 100)
            quota = CallQuota(backend, f"{key_prefix}:quota", 10, "day")
            await limiter.acquire()
            await quota.reserve()
            await client.script_flush()
            assert await client.script_exists(*(s.sha for s in backend._scripts.values())) == [
                False
            ] * len(backend._scripts)
            await limiter.on_throttled()  # each script reloads on first use (NOSCRIPT)
            await limiter.acquire()
            await quota.reserve()
            assert await quota.used() == 2  # the flush lost scripts, not state
            assert (await limiter.state()).factor_ppm < 1_000_000
        finally:
            await client.aclose()

    asyncio.run(body())


class _OwnRedis:
    """A redis-server of this test's own, restartable on the same port (no persistence)."""

    def __init__(self) -> None:
        from carnumber.embedded_redis import _free_port, redis_server_binary

        self.binary = redis_server_binary()
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/tmp",
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(port=self.port, socket_connect_timeout=0.2) as probe:
                    probe.ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "own redis-server did not start"
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def own_redis() -> Iterator[_OwnRedis]:
    server = _OwnRedis()
    server.start()
    yield server
    server.stop()


def test_a_redis_restart_loses_state_but_not_the_limiter(own_redis: _OwnRedis) -> None:
    async def body() -> None:
        client = Redis.from_url(own_redis.url)
        try:
            backend = RedisBackend(client, unreachable_s=5.0)
            limiter = RateLimiter(backend, "t:rate", 2)  # one slot per 500 ms
            quota = CallQuota(backend, "t:quota", 5, "total")
            await limiter.acquire()
            await quota.reserve()
            assert (await limiter.state()).booked_ahead_us > 300_000

            own_redis.stop()
            restart = asyncio.get_running_loop().run_in_executor(None, own_redis.start)
            start = time.monotonic()
            await quota.reserve()  # retried until the server is back
            await restart
            # State lived only in memory: the counter restarted and the next slot is free at
            # once, i.e. at most one burst beyond the limit (documented in the design note).
            assert await quota.used() == 1
            assert (await limiter.state()).booked_ahead_us == 0
            await limiter.acquire()
            assert time.monotonic() - start < 5.0
        finally:
            await client.aclose()

    asyncio.run(body())


def test_an_unreachable_redis_pauses_instead_of_calling(own_redis: _OwnRedis) -> None:
    async def body() -> None:
        client = Redis.from_url(own_redis.url)
        try:
            backend = RedisBackend(client, unreachable_s=0.3)
            limiter = RateLimiter(backend, "t:rate", 10)
            quota = CallQuota(backend, "t:quota", 5, "day")
            await limiter.acquire()
            own_redis.stop()
            start = time.monotonic()
            with pytest.raises(Paused, match="Redis failed while reserving a rate-limit slot"):
                await limiter.acquire()
            assert time.monotonic() - start < 3.0
            with pytest.raises(Paused, match="reserving quota"):
                await quota.reserve()
            await limiter.on_throttled()  # best effort: logs, never raises
        finally:
            await client.aclose()

    asyncio.run(body())


def test_keys_expire_once_they_stop_mattering(redis_url: str, key_prefix: str) -> None:
    async def body() -> None:
        client = Redis.from_url(redis_url)
        try:
            backend = RedisBackend(client)
            limiter = RateLimiter(backend, f"{key_prefix}:rate", 10)
            await limiter.acquire()
            assert 0 < await client.pttl(limiter.key) <= 1_100  # TAT + 1 s
            await limiter.on_throttled()
            # Back at the limit in 1 s, but the throttle counts towards telling lone ones from
            # repeated ones until its weight has decayed below 1 %: ln(100) x 30 s, + 1 s.
            assert 138_000 < await client.pttl(limiter.adapt_key) <= 139_200
            day = CallQuota(backend, f"{key_prefix}:quota", 5, "day")
            await day.reserve()
            state = await backend.quota_peek(day.key_prefix, "day", 0)
            redis_now = (await client.time())[0]
            ttl = await client.ttl(state.window_key)
            assert abs(ttl - (state.resets_at_s + 86_400 - redis_now)) <= 2
            total = CallQuota(backend, f"{key_prefix}:quota", 5, "total")
            await total.reserve()
            assert await client.ttl(f"{key_prefix}:quota:total") == -1
        finally:
            await client.aclose()

    asyncio.run(body())


if __name__ == "__main__":
    url, prefix, qps, tasks, duration, limit = sys.argv[1:7]
    out = asyncio.run(_worker(url, prefix, float(qps), int(tasks), float(duration), int(limit)))
    print(json.dumps(out))
