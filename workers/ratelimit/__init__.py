"""One global rate limit and one call quota for the whole fleet of an account.

::

    limiter, quota = from_settings(settings, redis_client)   # redis.asyncio.Redis, or None
    await limiter.acquire()        # wait for a slot: at most qps*t + burst calls in any t seconds
    await quota.reserve()          # count the call (raises QuotaExhausted when spent)
    ...send...                     # on a Throttling answer: await limiter.on_throttled()
                                   # (a lone one: a few % for about a second; repeated: AIMD)

Algorithm apart from storage: :mod:`.gcra`, :mod:`.adapt` and :mod:`.windows` are plain functions; a
:class:`Backend` keeps the state, either :class:`RedisBackend` (one Lua script per step, Redis's
clock, shared by every host) or :class:`MemoryBackend` (one process, injected clocks).
Design note: ``ops/design/rate-limit.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workers.keys import Keys, account_tag
from workers.ratelimit.adapt import Reaction
from workers.ratelimit.backend import Backend, QuotaState, RateState
from workers.ratelimit.gcra import Grant, Rate
from workers.ratelimit.limiter import RateLimiter, Slot
from workers.ratelimit.memory import MemoryBackend
from workers.ratelimit.quota import CallQuota
from workers.ratelimit.redis_backend import RedisBackend

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from workers.config import Settings

__all__ = [
    "Backend",
    "CallQuota",
    "Grant",
    "MemoryBackend",
    "QuotaState",
    "Rate",
    "RateLimiter",
    "RateState",
    "Reaction",
    "RedisBackend",
    "Slot",
    "from_settings",
]


def from_settings(
    settings: Settings, redis: Redis | None, *, backend: Backend | None = None
) -> tuple[RateLimiter, CallQuota]:
    """The limiter and quota of ``settings.limit_group()`` (``CARNUMBER_ACCOUNT``, else the
    AccessKeyId), from ``qps``, ``burst``, ``rate_guard_ms``, ``quota`` and ``quota_window``,
    under ``settings.key_prefix``.

    State lives in ``redis`` (shared by the fleet); with ``None``, in a fresh
    :class:`MemoryBackend` (this process only) unless ``backend`` is given. Raises
    :class:`ConfigError` when neither an account nor an AccessKeyId is set (the limit is per
    account).
    """
    group = settings.limit_group()  # ConfigError before any backend is built
    if backend is None:
        backend = RedisBackend(redis) if redis is not None else MemoryBackend()
    keys = Keys(settings.key_prefix)
    account = account_tag(group)
    limiter = RateLimiter(
        backend,
        keys.rate(account),
        settings.qps,
        settings.burst,
        guard_s=settings.rate_guard_ms / 1000,
    )
    quota = CallQuota(backend, keys.quota(account), settings.quota, settings.quota_window)
    return limiter, quota
