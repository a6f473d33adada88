"""Clients that ride out a Redis restart for CARNUMBER_REDIS_OUTAGE_S, measured in time, not in
retries: a restart refuses connections at once, and a count of retries ran out in seconds (the
fault campaign's producer gave up 4 s into a 25 s restart with an outage setting of 20 s)."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from ops.drills.harness import DrillRedis
from workers.redis_client import resilient_redis


def test_a_command_waits_out_a_restart_shorter_than_the_outage(own_redis: DrillRedis) -> None:
    client = resilient_redis(own_redis.url, outage_s=20)
    client.set("k", "v")
    own_redis.stop()
    threading.Timer(6.0, own_redis.start).start()
    started = time.monotonic()
    assert client.get("k") == b"v"  # AOF kept it
    assert time.monotonic() - started >= 5.0
    client.close()


def test_a_command_gives_up_once_the_outage_is_over(own_redis: DrillRedis) -> None:
    client = resilient_redis(own_redis.url, outage_s=3)
    client.ping()
    own_redis.stop()
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    assert 1.5 <= time.monotonic() - started <= 6.0
    client.close()
    own_redis.start()
