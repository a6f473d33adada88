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

from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from workers.redis_connect import sync_client

__all__ = ["BACKOFF_CAP_S", "resilient_redis"]

BACKOFF_CAP_S = 5.0
SOCKET_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 5.0


def resilient_redis(url: str, outage_s: float, **access: Any) -> redis.Redis:
    """A client for ``url`` whose commands retry for about ``outage_s`` seconds of outage.
    ``access``: ``master_name`` and ``sentinel_password`` for ``sentinel://`` URLs
    (``Settings.redis_access()``)."""
    # Each retry waits up to the backoff cap plus a connect timeout (refused at once on a
    # restart; the full timeout on a cut link): count retries for the slower case.
    retries = max(3, int(outage_s / BACKOFF_CAP_S))
    return sync_client(
        url,
        **access,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_keepalive=True,
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=BACKOFF_CAP_S, base=0.1), retries),
    )
