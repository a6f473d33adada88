"""Leases on chunk messages: a dead worker node's chunks go to another node within about a minute.

Kombu's Redis transport keeps every message a worker has taken but not yet acknowledged in the
``unacked`` hash, with its delivery time in the ``unacked_index`` sorted set. Kombu itself hands
such messages back only after ``visibility_timeout`` (12 h here, so it never interferes). We
put a *lease* on them instead (design note: ``ops/design/sink.md``, "Leases"):

* every live worker node renews the leases of all the messages it holds (running, prefetched or
  waiting for a retry countdown) every ``lease_s / 4``, setting their score to *Redis's* clock in
  one script (:data:`RENEW`), so a slow chunk on a live node is never handed out twice;
* every node also sweeps every :data:`SWEEP_INTERVAL_S`: messages whose lease is older than
  ``CARNUMBER_LEASE_S`` (45 s) by Redis's clock (:data:`EXPIRED`) go back to their queue through
  kombu's own restore. A node that dies (SIGKILL, OOM, power, cut cable) stops renewing, so its
  chunks are running elsewhere about ``lease_s + SWEEP_INTERVAL_S`` later;
* only Redis's clock is read, so skewed worker clocks do not matter (a delivery's first lease time
  is Redis's too: ``workers/node/broker.py``); and a node sweeps only once *it* has reached Redis for
  ``lease_s`` without a break, and Redis has been up that long: after a restart, a fleet-wide cut or
  a failover to a replica, every live node has renewed before anyone judges a lease.

Renewal and sweeps run in the node's main process (the one that holds the broker connection), on
a thread of their own started by a consumer bootstep, so neither a busy pool nor a long chunk
delays them; the sweep uses a kombu connection of its own.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
from celery import bootsteps

from workers.redis_connect import broker_access, sync_client

__all__ = [
    "EXPIRED",
    "RENEW",
    "SWEEP_INTERVAL_S",
    "KombuRestorer",
    "LeaseKeeper",
    "LeaseRenewer",
    "held_delivery_tags",
]

log = logging.getLogger(__name__)

# How often each worker node looks for expired leases, seconds.
SWEEP_INTERVAL_S = 5.0

# KEYS[1] kombu's unacked_index (delivery tag -> delivery time, epoch s)  ARGV: delivery tags.
# Sets each tag still unacknowledged to Redis's own time; returns how many it renewed.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local renewed = 0
for _, tag in ipairs(ARGV) do
  if redis.call('ZSCORE', KEYS[1], tag) then
    redis.call('ZADD', KEYS[1], 'XX', string.format('%.6f', now), tag)
    renewed = renewed + 1
  end
end
return renewed
"""


# KEYS[1] kombu's unacked_index  ARGV[1] lease, s  ARGV[2] most tags to return.
# Returns the delivery tags whose lease ran out by Redis's clock, oldest first.
EXPIRED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZRANGE', KEYS[1], '-inf', string.format('%.6f', now - tonumber(ARGV[1])),
                  'BYSCORE', 'LIMIT', 0, tonumber(ARGV[2]))
"""


def held_delivery_tags(consumer: Any) -> set[str]:
    """Delivery tags of every message this node holds: those on its current broker channel
    (prefetched, running, waiting for a countdown) and those of tasks still running from an
    earlier channel (a reconnect after a Redis restart)."""
    from celery.worker import state

    tags: set[str] = set()
    channel = getattr(getattr(consumer, "task_consumer", None), "channel", None)
    delivered = getattr(getattr(channel, "qos", None), "_delivered", None)
    if delivered:
        with contextlib.suppress(RuntimeError):  # changed while copied: the next round gets it
            tags.update(str(t) for t in list(delivered))
    for request in list(state.active_requests) + list(state.reserved_requests):
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag:
            tags.add(str(tag))
    return tags


class LeaseRenewer:
    """Renews the leases of ``held()`` every ``lease_s / 4`` and hands expired ones back through
    ``restore(tag)`` every :data:`SWEEP_INTERVAL_S`, on a daemon thread until :meth:`stop`."""

    def __init__(
        self,
        client: redis.Redis,
        held: Callable[[], Iterable[str]],
        restore: Callable[[str], None],
        *,
        lease_s: float,
        index_key: str = "unacked_index",
    ) -> None:
        self.client = client
        self.held = held
        self.restore = restore
        self.lease_s = lease_s
        self.index_key = index_key
        self.restored = 0
        # Since when this node has reached Redis without a break (monotonic s): a lease it sees
        # expired may be one whose holder has not had a lease period to renew since the same
        # outage (a restart, a fleet-wide cut, a failover to a replica).
        self.connected_since: float | None = time.monotonic()
        self._renew = client.register_script(RENEW)
        self._expired = client.register_script(EXPIRED)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="carnumber-leases", daemon=True)

    def start(self) -> LeaseRenewer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=10)

    def renew_once(self) -> int:
        """Renew now; returns how many leases were renewed. Raises ``RedisError``."""
        # Even with nothing held: the round trip is how this node notices an outage.
        return int(self._renew(keys=[self.index_key], args=sorted(self.held())))

    def sweep_once(self, limit: int = 100) -> int:
        """Hand messages whose lease ran out back to their queue; returns how many. Raises
        ``RedisError``."""
        since = self.connected_since
        if since is None or time.monotonic() - since < self.lease_s:
            return 0  # back from an outage (or just started): live holders renew first
        if int(self.client.info("server")["uptime_in_seconds"]) < self.lease_s:
            return 0  # Redis restarted: live nodes renew first (their scores are outage-old)
        expired = self._expired(keys=[self.index_key], args=[self.lease_s, limit])
        for raw in expired:
            self.restore(raw.decode() if isinstance(raw, bytes) else str(raw))
        if expired:
            self.restored += len(expired)
            log.warning("lease ran out: %d chunk message(s) handed back to the queue", len(expired))
        return len(expired)

    def _loop(self) -> None:
        renew_every_s = self.lease_s / 4
        next_renew = next_sweep = time.monotonic()
        failing_since: float | None = None
        last_warning = 0.0
        while not self._stopped.is_set():
            now = time.monotonic()
            try:
                if now >= next_renew:
                    self.renew_once()
                    next_renew = now + renew_every_s
                    if self.connected_since is None:
                        self.connected_since = time.monotonic()
                if now >= next_sweep:
                    self.sweep_once()
                    next_sweep = now + SWEEP_INTERVAL_S
                if failing_since is not None:
                    log.warning("leases: Redis reachable again after %.0f s", now - failing_since)
                failing_since = None
            except Exception as exc:  # Redis or kombu away: try again, never let the thread die
                failing_since = failing_since or now
                self.connected_since = None
                if now - last_warning >= 10:
                    log.warning("leases: %s for %.0f s: %s", type(exc).__name__, now - failing_since, exc)
                    last_warning = now
                next_renew = next_sweep = now + 1.0
            self._stopped.wait(max(0.05, min(next_renew, next_sweep) - time.monotonic()))


class KombuRestorer:
    """``restore(tag)`` through kombu's own restore (queue lookup, ``redelivered`` flag), on a
    connection this thread owns."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._conn: Any = None

    def __call__(self, tag: str) -> None:
        if self._conn is None:
            self._conn = self.app.connection_for_write()
        try:
            self._conn.default_channel.qos.restore_by_tag(tag)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.release()


class LeaseKeeper(bootsteps.StartStopStep):
    """Consumer bootstep: one :class:`LeaseRenewer` per worker node, for the messages it holds.
    ``lease_s`` comes from the app's ``carnumber_lease_s`` setting."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.renewer: LeaseRenewer | None = None
        self._restorer: KombuRestorer | None = None
        self._consumer: Any = None

    def start(self, parent: Any) -> None:
        # Called again after every reconnect: keep one renewer, pointed at the newest consumer.
        self._consumer = parent
        if self.renewer is not None:
            return
        conf = parent.app.conf
        lease_s = float(conf.get("carnumber_lease_s") or 45.0)
        options = conf.broker_transport_options or {}
        opts = {"socket_timeout": 5, "socket_connect_timeout": 5, "socket_keepalive": True}
        client = sync_client(conf.broker_url, **broker_access(options), **opts)
        self._restorer = KombuRestorer(parent.app)
        self.renewer = LeaseRenewer(
            client,
            lambda: held_delivery_tags(self._consumer),
            self._restorer,
            lease_s=lease_s,
            index_key=options.get("unacked_index_key", "unacked_index"),
        ).start()
        log.info("chunk leases: %.0f s, renewed every %.1f s", lease_s, lease_s / 4)

    def shutdown(self, parent: Any) -> None:
        if self.renewer is not None:
            self.renewer.stop()
            self.renewer.client.close()
            self.renewer = None
        if self._restorer is not None:
            self._restorer.close()
