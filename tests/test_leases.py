"""Chunk leases (workers/node/leases.py) against a real Redis: renewals on Redis's clock, sweeps of
leases that ran out, and no sweep before live holders have had a lease period to renew."""

from __future__ import annotations

import signal
import time

import pytest
import redis

from ops.drills.harness import DrillRedis
from workers.node.leases import LeaseRenewer


def _redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


@pytest.fixture
def index(key_prefix: str) -> str:
    return f"{key_prefix}:unacked_index"


def _renewer(
    client: redis.Redis, index: str, held: set[str], restored: list[str], lease_s: float
) -> LeaseRenewer:
    def restore(tag: str) -> None:  # as kombu's restore_by_tag: off the index, back to its queue
        client.zrem(index, tag)
        restored.append(tag)

    return LeaseRenewer(client, lambda: held, restore, lease_s=lease_s, index_key=index)


def test_renewing_sets_held_leases_to_redis_time_and_leaves_others(
    redis_client: redis.Redis, index: str
) -> None:
    old = _redis_now(redis_client) - 100
    redis_client.zadd(index, {"mine": old, "theirs": old})
    renewer = _renewer(redis_client, index, {"mine", "acked-already"}, [], lease_s=10)
    assert renewer.renew_once() == 1  # an acked message is not brought back
    assert abs(redis_client.zscore(index, "mine") - _redis_now(redis_client)) < 1  # type: ignore[operator]
    assert redis_client.zscore(index, "theirs") == pytest.approx(old)
    assert redis_client.zscore(index, "acked-already") is None


def test_a_sweep_hands_back_only_leases_that_ran_out(redis_client: redis.Redis, index: str) -> None:
    now = _redis_now(redis_client)
    redis_client.zadd(index, {"dead": now - 30, "alive": now - 2})
    restored: list[str] = []
    renewer = _renewer(redis_client, index, set(), restored, lease_s=10)
    renewer.connected_since = time.monotonic() - 60  # reached Redis for longer than a lease
    if int(redis_client.info("server")["uptime_in_seconds"]) < 10:
        pytest.skip("this Redis started less than a lease ago")
    assert renewer.sweep_once() == 1
    assert restored == ["dead"]


def test_no_sweep_until_this_node_has_reached_redis_for_a_lease(
    redis_client: redis.Redis, index: str
) -> None:
    # After a fleet-wide cut every lease looks expired; the first node back must not hand out
    # the chunks of nodes that are about to renew.
    redis_client.zadd(index, {"other-node's": _redis_now(redis_client) - 300})
    restored: list[str] = []
    renewer = _renewer(redis_client, index, set(), restored, lease_s=10)
    assert renewer.sweep_once() == 0  # just (re)connected
    renewer.connected_since = None  # in an outage
    assert renewer.sweep_once() == 0
    assert restored == []


def test_after_a_cut_the_renewer_waits_a_lease_before_it_sweeps(own_redis: DrillRedis) -> None:
    client = redis.Redis.from_url(own_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    lease_s = 3.0
    client.zadd("unacked_index", {"other-node's": _redis_now(client) - 300})
    time.sleep(lease_s)  # Redis has been up for a lease: its own restart guard is out of the way
    restored: list[str] = []
    renewer = _renewer(client, "unacked_index", set(), restored, lease_s=lease_s)
    renewer.connected_since = None  # this node had been cut off, like every other
    assert own_redis.proc is not None
    renewer.start()
    try:
        reached = time.monotonic()
        deadline = reached + 30
        while not restored and time.monotonic() < deadline:
            time.sleep(0.05)
        assert restored == ["other-node's"]
        assert time.monotonic() - reached >= lease_s - 0.1
        # A cut in the middle (Redis frozen: its uptime runs on) resets the wait.
        client.zadd("unacked_index", {"another": _redis_now(client) - 300})
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(2)
            assert renewer.connected_since is None
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        back = time.monotonic()
        while len(restored) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert restored == ["other-node's", "another"]
        assert time.monotonic() - back >= lease_s - 1.0
    finally:
        renewer.stop()
        client.close()
