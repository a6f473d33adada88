"""Helpers shared by the ``test_ratelimit_*`` files (no tests here): the sliding-window check,
a backend wrapper that records what it was asked, and a runner parametrized over both backends."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import pytest
from redis.asyncio import Redis

from workers.ratelimit import Backend, Grant, MemoryBackend, RedisBackend

__all__ = ["BackendRunner", "Recording", "window_excess"]

T = TypeVar("T")


def window_excess(times: Sequence[float], qps: float, burst: int, slack_s: float = 0.0) -> float:
    """max over all windows ``[times[i], times[j]]`` of ``count - (qps * (span + slack_s) + burst)``.

    The limiter promises at most ``qps * t + burst`` admissions in any window of length ``t``, so
    the result is <= 0 exactly when the promise held (``slack_s`` widens every window).
    """
    ts = np.sort(np.asarray(times, dtype=np.float64))
    worst = -np.inf
    for k in range(1, len(ts)):
        span = float((ts[k:] - ts[:-k]).min())
        worst = max(worst, (k + 1) - (qps * (span + slack_s) + burst))
    return float(worst)


class Recording:
    """Wraps a backend: counts calls per method and keeps every grant handed out."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.grants: list[Grant] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            result = await method(*args, **kwargs)
            if name == "gcra_reserve":
                self.grants.append(result)
            return result

        return call


class BackendRunner:
    """Runs an async test body on a fresh event loop with a ``memory`` or ``redis`` backend."""

    def __init__(self, kind: str, redis_url: str) -> None:
        self.kind = kind
        self.redis_url = redis_url

    def __call__(self, body: Callable[[Backend], Awaitable[T]]) -> T:
        async def main() -> T:
            if self.kind == "memory":
                return await body(MemoryBackend())
            client = Redis.from_url(self.redis_url)
            try:
                return await body(RedisBackend(client))
            finally:
                await client.aclose()

        return asyncio.run(main())


@pytest.fixture(params=["memory", "redis"])
def run_backend(request: pytest.FixtureRequest, redis_url: str) -> BackendRunner:
    return BackendRunner(request.param, redis_url)
