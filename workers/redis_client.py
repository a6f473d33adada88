"""Synchronous Redis clients that ride out a Redis restart instead of failing the caller.

Every command is retried on connection errors and timeouts with capped exponential backoff for
about ``outage_s`` seconds (``CARNUMBER_REDIS_OUTAGE_S``), then the error is raised: a producer,
``status``, the metrics exporter or a worker's bookkeeping carries on after a restart of up to
that long, and exits non-zero after it (its supervisor starts it again). Socket timeouts and
keepalives make a connection that silently died (a network cut) fail instead of hanging.
This module imports nothing of ours.
"""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

__all__ = ["BACKOFF_CAP_S", "resilient_redis"]

BACKOFF_CAP_S = 5.0
SOCKET_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 5.0


def resilient_redis(url: str, outage_s: float) -> redis.Redis:
    """A client for ``url`` whose commands retry for about ``outage_s`` seconds of outage."""
    # Each retry waits up to the backoff cap plus a connect timeout (refused at once on a
    # restart; the full timeout on a cut link): count retries for the slower case.
    retries = max(3, int(outage_s / BACKOFF_CAP_S))
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_keepalive=True,
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=BACKOFF_CAP_S, base=0.1), retries),
    )
