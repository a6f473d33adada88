"""The whole flow as a user runs it: ``carnumber enqueue`` → a real Celery worker process →
local server → Parquet; then a spent quota that pauses the run and ``carnumber resume``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from carnumber.cli import main as cli
from carnumber.localstack import Child, start_worker
from ocrserver.config import ServerConfig
from ocrserver.server import RunningServer, start_server
from ocrserver.truth import make_test_image
from workers.books.runs import RunStore
from workers.config import Settings
from workers.keys import Keys
from workers.sink.dataset import open_dataset

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with start_server(ServerConfig(keys="flowid:flowsecret")) as srv:
        yield srv


def _archive(folder: Path, n: int) -> None:
    folder.mkdir()
    for i in range(n):
        image = make_test_image([{"text": f"浙B{i:05d}", "type": "小型汽车"}])
        (folder / f"cam1-{i:03d}.png").write_bytes(image)


def _env(server: RunningServer, redis_url: str, key_prefix: str, tmp: Path, **extra: str) -> dict[str, str]:
    return {
        "CARNUMBER_ENDPOINT": server.url,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "flowid",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "flowsecret",
        "REDIS_URL": redis_url,
        "CARNUMBER_KEY_PREFIX": key_prefix,
        "CARNUMBER_QUEUE": f"{key_prefix}:queue",
        "CARNUMBER_OUTPUT": str(tmp / "out"),
        "CARNUMBER_CHUNK_SIZE": "5",
        "CARNUMBER_QPS": "0",
        **extra,
    }


def _worker(env: dict[str, str], via_cli: bool = False, pool: str = "prefork") -> Child:
    name = f"t{abs(hash(env['CARNUMBER_KEY_PREFIX'] + env['CARNUMBER_ENDPOINT']))}@%h"
    # threads: two chunks at once in one process, sharing its engine and call slots.
    concurrency = 2 if pool == "threads" else 1
    return start_worker(
        env, concurrency=concurrency, hostname=name, via_cli=via_cli, extra=[f"--pool={pool}"]
    )


def _store(client: redis.Redis, key_prefix: str) -> RunStore:
    return RunStore(client, Keys(key_prefix))


def _accepted(server: RunningServer) -> int:
    return int(httpx.get(f"{server.url}/__carnumber/stats").json()["accepted_total"])


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_enqueue_worker_parquet(
    server: RunningServer,
    redis_url: str,
    redis_client: redis.Redis,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pool: str,
) -> None:
    _archive(tmp_path / "archive", 23)
    env = _env(server, redis_url, key_prefix, tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    worker = _worker(env, pool=pool)
    try:
        assert cli(["enqueue", str(tmp_path / "archive"), "--run", "night-1", "--wait"]) == 0
        # Running the same command again enqueues nothing new.
        assert cli(["enqueue", str(tmp_path / "archive"), "--run", "night-1"]) == 0
    finally:
        worker.stop()
    assert cli(["compact", "night-1"]) == 0
    rows = open_dataset(env["CARNUMBER_OUTPUT"]).read_run("night-1").to_pylist()
    assert len(rows) == 23 and len({r["image_id"] for r in rows}) == 23
    assert {r["plate"] for r in rows} == {f"浙B{i:05d}" for i in range(23)}
    assert _accepted(server) == 23
    # A later run over the same archive skips everything already answered.
    assert cli(["enqueue", str(tmp_path / "archive"), "--run", "night-2"]) == 0
    night2 = _store(redis_client, key_prefix).get("night-2")
    assert night2 is not None and night2.enqueued == 0 and night2.state == "done"


def test_quota_pauses_the_run_and_resume_finishes_it(
    server: RunningServer,
    redis_url: str,
    redis_client: redis.Redis,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _archive(tmp_path / "archive", 20)
    env = _env(server, redis_url, key_prefix, tmp_path, CARNUMBER_QUOTA="7", CARNUMBER_QUOTA_WINDOW="total")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    worker = _worker(env)
    try:
        assert cli(["enqueue", str(tmp_path / "archive"), "--run", "q", "--wait"]) == 3
    finally:
        worker.stop()
    assert _accepted(server) == 7  # exactly the quota, never more
    summary = _store(redis_client, key_prefix).get("q")
    assert summary is not None
    assert summary.state == "quota_exhausted" and summary.written == 7 and summary.parked == 13
    rows = open_dataset(env["CARNUMBER_OUTPUT"]).read_run("q").to_pylist()
    assert {r["status"] for r in rows} == {"ok"} and len(rows) == 7  # pending is not failed

    # The operator raises the budget; the run continues where it stopped.
    monkeypatch.setenv("CARNUMBER_QUOTA", "20")
    worker = _worker({**env, "CARNUMBER_QUOTA": "20"}, via_cli=True)  # `carnumber worker` this time
    try:
        assert cli(["resume", "q"]) == 0
        assert cli(["status", "q", "--follow"]) == 0
    finally:
        worker.stop()
    assert _accepted(server) == 20
    rows = open_dataset(env["CARNUMBER_OUTPUT"]).read_run("q").to_pylist()
    assert len(rows) == 20 and len({r["image_id"] for r in rows}) == 20
    assert Settings.from_env(env).quota == 7


def test_retry_failures_redoes_only_retryable_failures(
    redis_url: str, key_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ocrserver.faults import FaultConfig

    _archive(tmp_path / "archive", 20)
    pdf = tmp_path / "archive" / "cam1-999.png"
    pdf.write_bytes(b"%PDF-1.7\n" + b"x" * 300)  # refused locally: a final failure, never retried
    down = ServerConfig(keys="flowid:flowsecret", faults=FaultConfig(rate_503=0.5), seed=11)
    with start_server(down) as flaky:
        env = _env(flaky, redis_url, key_prefix, tmp_path, CARNUMBER_MAX_ATTEMPTS="1")
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        worker = _worker(env)
        try:
            assert cli(["enqueue", str(tmp_path / "archive"), "--run", "rf", "--wait"]) == 0
        finally:
            worker.stop()
    rows = open_dataset(env["CARNUMBER_OUTPUT"]).read_run("rf").to_pylist()
    retryable = {r["image_id"] for r in rows if r["status"] == "failed" and r["retryable"]}
    assert 0 < len(retryable) < 20
    assert sum(1 for r in rows if r["error_code"] == "local.unsupportedFormat") == 1

    with start_server(ServerConfig(keys="flowid:flowsecret")) as healthy:
        monkeypatch.setenv("CARNUMBER_ENDPOINT", healthy.url)
        worker = _worker({**env, "CARNUMBER_ENDPOINT": healthy.url})
        try:
            assert cli(["retry-failures", "rf"]) == 0
            assert cli(["status", "rf", "--follow"]) == 0
        finally:
            worker.stop()
        assert _accepted(healthy) == len(retryable)  # only those were called again
    assert cli(["compact", "rf"]) == 0
    rows = open_dataset(env["CARNUMBER_OUTPUT"]).read_run("rf").to_pylist()
    assert len(rows) == 21 and len({r["image_id"] for r in rows}) == 21
    assert sorted(r["status"] for r in rows).count("ok") == 20
    assert cli(["retry-failures", "rf", "--dry-run"]) == 0
