"""Per-call counters (workers.metrics) over real Redis: buffering, minute buckets, latency
histogram, bounded code labels, and counts kept (not raised) when Redis is down."""

from __future__ import annotations

import socket
from datetime import UTC, datetime

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from workers.keys import Keys
from workers.metrics import CallCounter, minute_bucket, read_call_stats

T0 = datetime(2026, 11, 24, 13, 5, 10, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_minute_bucket_is_utc() -> None:
    assert minute_bucket(T0) == "m:202611241305"


def test_counts_are_buffered_then_flushed_into_total_and_minute_hashes(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    keys, clock = Keys(key_prefix), Clock(T0)
    counter = CallCounter(redis_client, keys, "acct", flush_s=1.0, minute_ttl_s=600, clock=clock)
    counter("ok", 0.12)
    counter("InternalError", 0.3)
    assert not redis_client.exists(keys.calls("acct", "total"))  # buffered: no round trip yet
    clock.t += 60  # next minute; this call is due for a flush
    counter("ok", 2.0)
    total = read_call_stats(redis_client, keys, "acct")
    assert total.by_code == {"ok": 2, "InternalError": 1}
    assert total.calls == 3 and total.latency_count == 3
    assert abs(total.latency_sum_s - 2.42) < 1e-9
    assert dict(total.buckets)[0.25] == 1 and dict(total.buckets)[2.5] == 3
    first = redis_client.hgetall(keys.calls("acct", "m:202611241305"))
    assert first == {
        b"c:ok": b"1",
        b"c:InternalError": b"1",
        b"lat_n": b"2",
        b"lat_sum_ms": b"420",
        b"lat_le:250": b"1",
        b"lat_le:500": b"2",
        b"lat_le:1000": b"2",
        b"lat_le:2500": b"2",
        b"lat_le:5000": b"2",
        b"lat_le:10000": b"2",
        b"lat_le:30000": b"2",
    }
    assert 0 < redis_client.ttl(keys.calls("acct", "m:202611241305")) <= 600
    assert redis_client.ttl(keys.calls("acct", "total")) == -1
    recent = read_call_stats(redis_client, keys, "acct", last_minutes=1, now_s=clock.t)
    assert recent.by_code == {"ok": 1}
    both = read_call_stats(redis_client, keys, "acct", last_minutes=2, now_s=clock.t)
    assert both.by_code == {"ok": 2, "InternalError": 1}


def test_codes_outside_the_safe_alphabet_become_other(redis_client: redis.Redis, key_prefix: str) -> None:
    counter = CallCounter(redis_client, Keys(key_prefix), "acct")
    counter('evil"}\nlabel')
    counter("x" * 65)
    counter("Throttling.User")
    counter.flush()
    stats = read_call_stats(redis_client, Keys(key_prefix), "acct")
    assert stats.by_code == {"other": 2, "Throttling.User": 1}
    assert stats.latency_count == 0


def test_redis_down_keeps_counts_for_the_next_flush(redis_client: redis.Redis, key_prefix: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    dead = redis.Redis(
        host="127.0.0.1", port=dead_port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    keys = Keys(key_prefix)
    counter = CallCounter(dead, keys, "acct", flush_s=0.0)
    counter("ok", 0.1)  # flush fails: logged, not raised
    counter("ok", 0.1)
    dead.close()
    counter.r = redis_client  # Redis is back
    counter.flush()
    assert read_call_stats(redis_client, keys, "acct").by_code == {"ok": 2}
