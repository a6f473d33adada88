"""The internals of kombu, Celery and redis-py that our code relies on, pinned by shape.

The leases (workers/node/leases.py), the repaired transport (workers/node/broker.py) and the live-chunk
scan (workers/books/queued.py) reach past these libraries' public APIs: kombu's ``unacked`` hash and
``unacked_index`` sorted set, ``QoS._delivered``, ``QoS.restore_by_tag``, the Channel and QoS
methods we override, ``Connection.collect``'s ``_collect`` hook, Celery's worker state and the
``Tasks`` bootstep's ``task_consumer``. A release that renames, removes or reshapes any of them
makes this file fail with the name of what changed, before a drill has to find it out.
``ops/upgrade_check.py`` runs it against the newest releases.
"""

from __future__ import annotations

import inspect
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from workers.node import broker
from workers.node.broker import transport_for


def _params(func: Any) -> list[str]:
    return [p for p in inspect.signature(func).parameters if p != "self"]


def _kombu_definition(cls: type, name: str) -> Any:
    """The first definition of ``name`` in ``cls``'s bases that is not ours."""
    for base in cls.__mro__[1:]:
        if not base.__module__.startswith("workers.") and name in vars(base):
            return vars(base)[name]
    return None


OURS = [broker.QoS, broker.Channel, broker.SentinelChannel, broker.Transport, broker.SentinelTransport]


@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_every_method_we_override_exists_in_kombu_with_the_same_parameters(cls: type) -> None:
    ours = {
        name: value
        for klass in cls.__mro__
        if klass.__module__.startswith("workers.")
        for name, value in vars(klass).items()
        if inspect.isfunction(value) and name != "__init__"
    }
    assert ours, f"{cls.__name__}: nothing overridden?"
    for name, func in ours.items():
        if name == "_collect":  # a hook kombu looks up by name (below), not a method it defines
            continue
        theirs = _kombu_definition(cls, name)
        assert theirs is not None, f"kombu's {cls.__name__} no longer has {name}()"
        assert _params(func) == _params(theirs), (
            f"kombu's {cls.__name__}.{name}{inspect.signature(theirs)} changed shape; "
            f"ours is {name}{inspect.signature(func)}"
        )


def test_the_names_we_read_are_still_there() -> None:
    for name in ("unacked_key", "unacked_index_key", "unacked_mutex_key", "global_keyprefix",
                 "conn_or_acquire", "_get_pool", "_connparams", "client", "QoS"):  # fmt: skip
        assert hasattr(kombu_redis.Channel, name), f"kombu.transport.redis.Channel.{name} is gone"
    for name in ("restore_by_tag", "restore_unacked", "append", "unacked_key", "unacked_index_key"):
        assert hasattr(kombu_redis.QoS, name), f"kombu.transport.redis.QoS.{name} is gone"
    assert _params(kombu_redis.QoS.restore_by_tag)[:1] == ["tag"]
    assert "_delivered" in inspect.getsource(virtual.QoS.__init__), "virtual.QoS._delivered is gone"
    # Connection.collect() calls the transport's _collect(connection) when it has one.
    assert "_transport._collect" in inspect.getsource(Connection.collect)
    assert kombu_redis.Transport.Channel is kombu_redis.Channel
    assert kombu_redis.SentinelTransport.Channel is kombu_redis.SentinelChannel


def test_celery_worker_internals_the_lease_keeper_reads() -> None:
    from celery import bootsteps
    from celery.utils.imports import symbol_by_name
    from celery.worker import state
    from celery.worker.consumer import tasks

    for held in (state.active_requests, state.reserved_requests):  # iterated by held_delivery_tags
        assert hasattr(held, "add") and list(held) == []
    assert symbol_by_name("celery.worker.consumer.tasks:Tasks") is tasks.Tasks
    assert "c.task_consumer" in inspect.getsource(tasks.Tasks.start)
    for hook in ("start", "stop"):
        assert hasattr(bootsteps.StartStopStep, hook)
    # Our steps' close() hook (workers/node/shutdown.py) is called by name.
    assert "'close'" in inspect.getsource(bootsteps.Blueprint.close)


# -- the same, on a real Redis ------------------------------------------------------------


@pytest.fixture
def names(redis_url: str, redis_client: redis.Redis) -> Iterator[dict[str, str]]:
    tag = f"cntest-shape-{uuid.uuid4().hex[:8]}"
    out = {"queue": tag, "unacked": f"{tag}:unacked", "index": f"{tag}:unacked_index", "url": redis_url}
    yield out
    redis_client.delete(tag, out["unacked"], out["index"], f"{tag}:unacked_mutex", f"_kombu.binding.{tag}")


def test_a_held_message_lives_where_leases_and_the_scan_look(
    names: dict[str, str], redis_client: redis.Redis
) -> None:
    conn = Connection(
        names["url"], transport=transport_for(names["url"]),
        transport_options={"unacked_key": names["unacked"], "unacked_index_key": names["index"]},
    )  # fmt: skip
    try:
        queue = Queue(names["queue"], Exchange(names["queue"]), names["queue"])
        with conn.Producer() as producer:
            producer.publish({"n": 1}, exchange=queue.exchange, routing_key=names["queue"], declare=[queue])
        channel = conn.default_channel
        message = channel.basic_get(names["queue"], no_ack=False)
        assert message is not None
        tag = message.delivery_tag
        # workers/node/leases.py: what the node holds, and the lease's score (Redis's clock).
        assert tag in channel.qos._delivered
        score = redis_client.zscore(names["index"], tag)
        redis_now = float(".".join(str(x) for x in redis_client.time()))
        assert score is not None and abs(score - redis_now) < 5
        # workers/books/queued.py: the held message is [message, exchange, routing_key] in JSON.
        raw = redis_client.hget(names["unacked"], tag)
        held = json.loads(raw)
        assert isinstance(held, list) and len(held) == 3 and isinstance(held[0], dict)
        assert "body" in held[0] and held[2] == names["queue"]
        # A transport's channels (broker.py's _collect walks them).
        transport = conn.transport
        assert hasattr(transport, "channels") and hasattr(transport, "_avail_channels")
        assert hasattr(transport, "cycle") and hasattr(transport, "default_port")
        # workers/node/leases.py's KombuRestorer: restore_by_tag puts it back on its queue.
        channel.qos.restore_by_tag(tag)
        assert redis_client.hget(names["unacked"], tag) is None
        assert redis_client.zscore(names["index"], tag) is None
        assert redis_client.llen(names["queue"]) == 1
        # The queue holds the same message as a JSON object with the body (queued.py reads it).
        queued = json.loads(redis_client.lindex(names["queue"], 0))
        assert queued["properties"]["delivery_tag"] == tag and "body" in queued
        channel.qos._delivered.pop(tag, None)
    finally:
        conn.release()
