"""The Celery broker transport: kombu's Redis transport with three repairs our leases rely on.

Celery picks it through ``broker_transport`` (:func:`transport_for`), for ``redis://``,
``rediss://`` and ``sentinel://`` URLs alike. Design note: ``ops/design/sink.md`` ("Leases").

1. **A lost connection never crashes the node.** When Celery loses the broker it *collects* the
   connection (kombu detaches its transport: ``transport.client = None``) and then closes it. A
   channel that the collect could not close (it was waiting in BRPOP: a node holding fewer
   messages than its prefetch limit, e.g. exactly one of two) is closed then, and restores its
   unacknowledged messages, which needs a new connection pool, whose parameters come from
   ``transport.client``: ``AttributeError: 'NoneType' object has no attribute 'hostname'`` (the
   kombu issue family #582, #970). Celery reports it as an *unrecoverable error*: the node stopped
   consuming for good and exited 0 after its chunk.
2. **Messages a node still holds stay leased, not restored, when its connection drops.** Kombu
   would put them back in the queue while their tasks still run (a second holder for every
   chunk in progress). Here they stay in ``unacked``: the node's lease keeper renews them after it
   reconnects and the task acks them when done; if the node is really gone, its leases run out.
   A clean close (warm shutdown) still restores what the node held, as kombu does.
3. **A lease's first time is Redis's time**, not the worker's: kombu stamps ``unacked_index`` with
   the local clock, so a worker 40 s behind Redis had its chunks swept before its first renewal.

Acks of tasks that outlive their connection (they finish after a reconnect) still reach Redis:
a detached channel builds its pool from the connection parameters it kept. This module imports
nothing of ours; ``tests/test_broker.py`` pins the kombu internals it touches.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from kombu import Connection
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["SentinelTransport", "Transport", "transport_for"]

log = logging.getLogger(__name__)

# KEYS[1] unacked_index  KEYS[2] unacked  ARGV[1] delivery tag  ARGV[2] the message, as kombu keeps it.
# kombu's QoS.append, with the delivery time read from Redis's own clock.
_APPEND = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], string.format('%d.%06d', t[1], t[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel.global_keyprefix:  # kombu prefixes keys itself; scripts would bypass it
            super().append(message, delivery_tag)
            return
        delivery = message.delivery_info
        payload = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        with self.channel.conn_or_acquire() as client:
            client.eval(_APPEND, 2, self.unacked_index_key, self.unacked_key, delivery_tag, payload)
        # virtual.QoS.append: remember the message as delivered on this channel
        virtual.QoS.append(self, message, delivery_tag)

    def restore_unacked(self, client: Any = None) -> None:
        if getattr(self.channel, "connection_lost", False) or _detached(self.channel):
            # The connection was lost, not closed: the node still holds these messages (its
            # tasks run on); its lease keeper renews them, and if the node is gone they come
            # back when their leases run out.
            if self._delivered:
                log.info("broker connection lost: %d held message(s) stay leased", len(self._delivered))
            return
        super().restore_unacked(client)


class _Detached:
    """What a pool needs of a transport, for a channel whose transport was detached."""

    def __init__(self, client: Any, default_port: int) -> None:
        self.client = client
        self.default_port = default_port


def _detached(channel: Any) -> bool:
    transport = channel.connection
    return transport is None or transport.client is None


class _KeepsConnectionInfo:
    """Channel mixin: a channel whose connection was collected can still build a (synchronous)
    pool, for the acks of tasks that outlived the connection."""

    connection: Any

    def __init__(self, connection: Any, *args: Any, **kwargs: Any) -> None:
        self._kept_client = connection.client
        self._kept_port = connection.default_port
        super().__init__(connection, *args, **kwargs)  # type: ignore[call-arg]

    def _get_pool(self, asynchronous: bool = False) -> Any:
        if not _detached(self):
            return super()._get_pool(asynchronous)  # type: ignore[misc]
        if asynchronous or self._kept_client is None:
            raise RedisConnectionError("broker connection closed")
        transport = self.connection
        self.connection = _Detached(self._kept_client, self._kept_port)
        try:
            return super()._get_pool(False)  # type: ignore[misc]
        finally:
            self.connection = transport


class Channel(_KeepsConnectionInfo, kombu_redis.Channel):
    QoS = QoS


class SentinelChannel(_KeepsConnectionInfo, kombu_redis.SentinelChannel):
    QoS = QoS


class _CollectsAsLost:
    """Transport mixin: ``Connection.collect()`` (what Celery calls when the broker connection is
    lost, and kombu's pools after a fork) closes the channels as *lost*: without restoring the
    messages they hold. A plain ``close()`` (a warm shutdown) still restores them."""

    channels: list[Any]
    _avail_channels: list[Any]
    cycle: Any

    def _collect(self, connection: Any) -> None:
        channels = [*self.channels, *self._avail_channels]
        for channel in channels:
            channel.connection_lost = True
        for channel in channels:
            # A dead socket may raise anything on the way out; the channel is gone either way.
            with contextlib.suppress(Exception):
                channel.close()
        with contextlib.suppress(Exception):
            self.cycle.close()


class Transport(_CollectsAsLost, kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(_CollectsAsLost, kombu_redis.SentinelTransport):
    Channel = SentinelChannel


# One name per URL scheme, so that kombu renders our transport's URLs with the scheme they came
# with (logs, and Flower, which picks its broker client by the scheme of ``as_uri``).
_BY_SCHEME = {"redis": "Transport", "rediss": "TLSTransport", "sentinel": "SentinelTransport"}
TLSTransport = Transport
for _scheme, _name in _BY_SCHEME.items():
    Connection.resolve_aliases[f"{__name__}:{_name}"] = _scheme


def transport_for(url: str) -> str:
    """The ``broker_transport`` for a broker URL (``redis://``, ``rediss://``, ``sentinel://``)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else "redis"
    return f"{__name__}:{_BY_SCHEME.get(scheme, 'Transport')}"
