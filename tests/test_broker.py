"""The repaired Redis transport (workers/node/broker.py), against a real Redis, through kombu itself.

Celery's reaction to a lost broker is ``connection.collect()`` then ``connection.close()``; on
kombu's own transport that close crashed (``'NoneType' object has no attribute 'hostname'``)
whenever the channel held an unacknowledged message, and Celery stopped the node for good.
"""

from __future__ import annotations

import contextlib
import socket
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis

from ops.drills.harness import DrillRedis
from workers.node.broker import transport_for


@pytest.fixture
def broker(redis_url: str, redis_client: redis.Redis) -> Iterator[dict[str, str]]:
    """A queue and kombu's unacked bookkeeping under names of this test's own."""
    tag = f"cntest-broker-{uuid.uuid4().hex[:8]}"
    names = {"queue": tag, "unacked": f"{tag}:unacked", "index": f"{tag}:unacked_index", "url": redis_url}
    yield names
    redis_client.delete(
        tag, names["unacked"], names["index"], f"{tag}:unacked_mutex", f"_kombu.binding.{tag}"
    )


def _connection(b: dict[str, str], transport: str | None = None) -> Connection:
    return Connection(
        b["url"],
        transport=transport or transport_for(b["url"]),
        transport_options={"unacked_key": b["unacked"], "unacked_index_key": b["index"]},
    )


def _take_one(conn: Connection, b: dict[str, str]) -> object:
    """Publish one message and take it without acking: the channel holds it, as a worker does."""
    queue = Queue(b["queue"], Exchange(b["queue"]), b["queue"])
    with conn.Producer() as producer:
        producer.publish({"n": 1}, exchange=queue.exchange, routing_key=b["queue"], declare=[queue])
    message = conn.default_channel.basic_get(b["queue"], no_ack=False)
    assert message is not None
    return message


def _consume_one(conn: Connection, b: dict[str, str]) -> object:
    """As a Celery worker with two slots: hold one message, and wait in BRPOP for the next."""
    queue = Queue(b["queue"], Exchange(b["queue"]), b["queue"])
    with conn.Producer() as producer:
        producer.publish({"n": 1}, exchange=queue.exchange, routing_key=b["queue"], declare=[queue])
    got: list[object] = []
    consumer = conn.Consumer([queue], callbacks=[lambda _body, message: got.append(message)])
    consumer.qos(prefetch_count=2)
    consumer.consume()
    for _ in range(20):
        with contextlib.suppress(socket.timeout, TimeoutError):
            conn.drain_events(timeout=0.2)
        if got:
            break
    with contextlib.suppress(socket.timeout, TimeoutError):
        conn.drain_events(timeout=0.2)  # the next BRPOP is on the wire
    assert len(got) == 1
    return got[0]


def _lose(conn: Connection) -> None:
    """What Celery's consumer does when the broker connection is lost: collect, then close."""
    with contextlib.suppress(Exception):  # Celery ignores whatever collect raises
        conn.collect(socket_timeout=1)
    conn.close()


def _lost_mid_poll(own_redis: DrillRedis, b: dict[str, str], transport: str | None = None) -> object:
    """A consumer holding exactly one message loses Redis (a restart) while it polls for more."""
    conn = _connection({**b, "url": own_redis.url}, transport)
    message = _consume_one(conn, b)
    own_redis.stop()
    try:
        _lose(conn)
    finally:
        own_redis.start()
    return message


@pytest.mark.parametrize(("transport", "restored"), [("redis", 1), (None, 0)])
def test_a_lost_connection_leaves_what_the_node_holds_leased(
    broker: dict[str, str], redis_client: redis.Redis, transport: str | None, restored: int
) -> None:
    # kombu's own transport puts a held message back in the queue when the connection is lost,
    # while its task still runs: a second holder for every chunk in progress.
    conn = _connection(broker, transport)
    _consume_one(conn, broker)
    _lose(conn)
    assert redis_client.llen(broker["queue"]) == restored
    assert redis_client.hlen(broker["unacked"]) == 1 - restored


def test_acks_of_tasks_that_outlive_a_redis_restart_still_land(
    own_redis: DrillRedis, broker: dict[str, str]
) -> None:
    message = _lost_mid_poll(own_redis, broker)
    client = redis.Redis.from_url(own_redis.url)
    try:
        assert client.hlen(broker["unacked"]) == 1  # held across the restart (AOF kept it)
        message.ack()  # type: ignore[attr-defined]  # through the old, collected channel
        assert client.hlen(broker["unacked"]) == 0
        assert client.zcard(broker["index"]) == 0
    finally:
        client.close()


def test_a_clean_close_hands_held_messages_back_at_once(
    broker: dict[str, str], redis_client: redis.Redis
) -> None:
    conn = _connection(broker)
    _take_one(conn, broker)
    conn.close()  # a warm shutdown: what the node held goes back to the queue
    assert redis_client.llen(broker["queue"]) == 1
    assert redis_client.hlen(broker["unacked"]) == 0


def test_a_lease_starts_on_redis_clock_not_the_workers(
    broker: dict[str, str], redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker whose clock is 40 s behind Redis's (kombu stamps deliveries with time.time()).
    monkeypatch.setattr(kombu_redis, "time", lambda: time.time() - 40)
    conn = _connection(broker)
    try:
        message = _take_one(conn, broker)
        seconds, micros = redis_client.time()
        score = redis_client.zscore(broker["index"], message.delivery_tag)  # type: ignore[attr-defined]
        assert score is not None and abs(score - (seconds + micros / 1e6)) < 2
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://u:secret@127.0.0.1:6379/3", "redis://u:**@127.0.0.1:6379/3"),
        ("rediss://u:secret@127.0.0.1:6380/3", "rediss://u:**@127.0.0.1:6380/3"),
    ],
)
def test_urls_keep_their_scheme_and_hide_the_password(url: str, shown: str) -> None:
    # Logs, and Flower, which picks its broker client by the scheme of the URL it is shown.
    conn = Connection(url, transport=transport_for(url))
    assert conn.as_uri() == shown
    assert conn.as_uri(include_password=True).startswith(url.split("://")[0] + "://u:secret@")
