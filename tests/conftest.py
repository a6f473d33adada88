"""Shared fixtures: a real Redis (the machine's, else an embedded one) and a unique key prefix."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from carnumber.embedded_redis import EmbeddedRedis
from ops.drills.harness import DrillRedis

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
# Tests use database 9 of a machine's Redis (9 + n for pytest-xdist's worker n, so that Celery's
# broadcasts, kombu's unacked bookkeeping and the queues of two workers' tests never meet) and
# only keys under their own prefix.
TEST_DB = 9 + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)


def _machine_redis() -> str | None:
    url = os.environ.get("CARNUMBER_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{TEST_DB}")
    with contextlib.suppress(redis.RedisError, OSError):
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
        client.ping()
        client.close()
        return url
    return None


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = _machine_redis()
    if url:
        yield url
        return
    server = EmbeddedRedis()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    """A fresh key prefix; every key under it is deleted afterwards (and nothing else)."""
    prefix = f"cntest:{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.skip("../shared is not beside this clone")
    return SHARED


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[DrillRedis]:
    """A redis-server of this test's own (AOF on), to stop and start again."""
    server = DrillRedis(tmp_path)
    server.start()
    yield server
    server.stop(kill=True)
