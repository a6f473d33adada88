"""Redis Sentinel, for real: one master, two replicas and three Sentinels on loopback (``redis-server
--sentinel``), passwords on both. Our clients follow a failover and a demoted master coming back;
commands name a wrong master or Sentinel password clearly; a worker's stats, Flower's queue view
and ``inspect`` work through the Sentinels without showing their password. The fleet through a
failover mid-run: tests/test_failover_drill.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers.fleet_cli import ROOT, carnumber, flower_queue_lengths

from carnumber.localstack import start_worker
from ops.drills.redis_nodes import SentinelDeployment
from workers.redis_client import resilient_redis
from workers.redis_connect import async_client, sync_client

pytestmark = pytest.mark.timeout(120)

PASSWORD = "servers-pw-2718"
SENTINEL_PASSWORD = "sentinels-pw-1618"


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[SentinelDeployment]:
    d = SentinelDeployment(
        tmp_path, down_after_ms=2000, failover_timeout_ms=5000, appendonly=False, password=PASSWORD,
        sentinel_password=SENTINEL_PASSWORD,
    )  # fmt: skip
    try:
        yield d.start()
    finally:
        d.close()


def _access() -> dict[str, str]:
    return {"master_name": "mymaster", "sentinel_password": SENTINEL_PASSWORD}


def _sentinel_clients(d: SentinelDeployment) -> int:
    with contextlib.closing(d.sentinel_client()) as s:
        return len(s.client_list()) - 1


def test_clients_follow_a_failover_and_the_old_master_coming_back(deployment: SentinelDeployment) -> None:
    d = deployment
    client = resilient_redis(d.url, outage_s=30, **_access())
    client.set("k", "before")
    old = d.master()
    old.kill()
    # The client asks the Sentinels again on each retry: the write lands on the promoted replica.
    started = time.monotonic()
    client.set("k", "after")
    waited = time.monotonic() - started
    assert d.master().port != old.port and waited < 25

    async def write_async() -> bytes | None:
        ac = async_client(d.url, **_access(), socket_timeout=2)
        try:
            await ac.set("k2", "async")
            return await ac.get("k2")
        finally:
            await ac.aclose()

    assert asyncio.run(write_async()) == b"async"
    # The old master's host comes back: the Sentinels make it a replica; writes still go to the
    # master (a client that reached the old one would get READONLY and ask again).
    old.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.closing(d.node_client(old)) as back, contextlib.suppress(redis.RedisError):
            if back.info("replication")["role"] == "slave":
                break
        time.sleep(0.2)
    for i in range(20):
        client.set(f"n{i}", i)
    with contextlib.closing(d.node_client(d.master())) as master:
        assert master.get("n19") == b"19" and master.info("replication")["role"] == "master"
    client.close()


def test_closing_a_client_closes_its_sentinel_connections(deployment: SentinelDeployment) -> None:
    before = _sentinel_clients(deployment)
    for _ in range(5):
        c = sync_client(deployment.url, **_access())
        c.ping()
        c.close()

    async def cycle() -> None:
        for _ in range(5):
            ac = async_client(deployment.url, **_access())
            await ac.ping()
            await ac.aclose()

    asyncio.run(cycle())
    time.sleep(0.2)
    assert _sentinel_clients(deployment) <= before


def _env(d: SentinelDeployment, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "REDIS_URL": d.url, "CARNUMBER_SENTINEL_PASSWORD": SENTINEL_PASSWORD, "PYTHONPATH": str(ROOT),
        "CARNUMBER_KEY_PREFIX": "sent", "CARNUMBER_QUEUE": "sent-queue",
        "CARNUMBER_OUTPUT": str(tmp_path / "out"),
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "sid", "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "ssecret", **extra,
    }  # fmt: skip


def test_a_wrong_master_name_or_sentinel_password_is_named(
    deployment: SentinelDeployment, tmp_path: Path
) -> None:
    wrong_master = carnumber(["status"], _env(deployment, tmp_path, CARNUMBER_REDIS_MASTER="nosuch"))
    assert wrong_master.returncode == 2
    assert "cannot reach Redis at REDIS_URL=sentinel://:***@" in wrong_master.stderr
    assert "No master found for 'nosuch'" in wrong_master.stderr
    wrong_pw = carnumber(["status"], _env(deployment, tmp_path, CARNUMBER_SENTINEL_PASSWORD="nope"))
    assert wrong_pw.returncode == 2 and "No master found for 'mymaster'" in wrong_pw.stderr
    for out in (wrong_master, wrong_pw):
        assert PASSWORD not in out.stderr + out.stdout and SENTINEL_PASSWORD not in out.stderr + out.stdout


def test_worker_stats_inspect_and_flower_through_the_sentinels(
    deployment: SentinelDeployment, tmp_path: Path
) -> None:
    env = _env(deployment, tmp_path, CARNUMBER_ENDPOINT="http://127.0.0.1:9")
    worker = start_worker(env, hostname="sent@%h", via_cli=True, extra=["--loglevel=INFO"])
    try:
        stats = _inspect(env, "stats")
        assert "sent@" in stats and '"master_name": "mymaster"' in stats
        assert flower_queue_lengths(env, "sent-queue") == [{"name": "sent-queue", "messages": 0}]
        status = carnumber(["status"], env)
        assert status.returncode == 0, status.stderr
    finally:
        worker.stop()
    shown = "\n".join([stats, status.stdout, status.stderr, *worker.lines])
    assert any("ready" in line for line in worker.lines), "\n".join(worker.lines[-20:])
    assert PASSWORD not in shown and SENTINEL_PASSWORD not in shown


def _inspect(env: dict[str, str], what: str, timeout_s: float = 60) -> str:
    """``celery -A workers inspect WHAT --json`` until a worker answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "workers", "inspect", what, "--json", "--timeout=3"],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
        if out.returncode == 0 or time.monotonic() > deadline:
            assert out.returncode == 0, out.stdout + out.stderr
            return out.stdout
        time.sleep(0.5)
