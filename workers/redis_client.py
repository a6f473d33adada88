"""Synchronous Redis clients that ride out a Redis restart instead of failing the caller.

Every command is retried on connection errors and timeouts with capped exponential backoff for
about ``outage_s`` seconds (``CARNUMBER_REDIS_OUTAGE_S``), then the error is raised: a producer,
``status``, the metrics exporter or a worker's bookkeeping carries on after a restart of up to
that long (or a Sentinel failover: each retry asks the Sentinels for the master again), and exits
non-zero after it (its supervisor starts it again). Socket timeouts and keepalives make a
connection that silently died (a network cut) fail instead of hanging. Clients are made by
:mod:`workers.redis_connect`; this module imports nothing else of ours.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from workers.redis_connect import sync_client

__all__ = ["BACKOFF_CAP_S", "DeadlineRetry", "resilient_redis"]

T = TypeVar("T")

BACKOFF_CAP_S = 5.0
SOCKET_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 5.0


class DeadlineRetry(Retry):
    """redis-py's retry, bounded by time instead of a count: a restart refuses connections at
    once and a cut link times each one out, so a count of retries lasted anywhere from seconds
    to minutes (a producer gave up 4 s into a 25 s restart with ``outage_s`` = 20)."""

    def __init__(self, backoff: ExponentialBackoff, outage_s: float) -> None:
        super().__init__(backoff, -1)
        self.outage_s = outage_s

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        self._backoff.reset()
        deadline = time.monotonic() + self.outage_s
        failures = 0
        while True:
            try:
                return do()
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise error
                time.sleep(min(self._backoff.compute(failures), left))  # a last try at the deadline


def resilient_redis(url: str, outage_s: float, **access: Any) -> redis.Redis:
    """A client for ``url`` whose commands retry for ``outage_s`` seconds of outage.
    ``access``: ``master_name`` and ``sentinel_password`` for ``sentinel://`` URLs
    (``Settings.redis_access()``)."""
    return sync_client(
        url,
        **access,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_keepalive=True,
        health_check_interval=10,
        retry=DeadlineRetry(ExponentialBackoff(cap=BACKOFF_CAP_S, base=0.1), outage_s),
    )
