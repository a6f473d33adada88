"""``carnumber pause`` and ``carnumber cancel`` with a real Celery worker and the local server:
once the command returns the server sees no new call for the run (the calls in flight finish),
the run's unanswered images are parked, and ``resume`` (``--force`` after a cancel) finishes it
with every image exactly once. Another run on the same account goes on meanwhile."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from carnumber.cli import main as cli
from carnumber.localstack import Child, start_worker
from ocrserver.config import ServerConfig
from ocrserver.server import RunningServer, start_server
from ocrserver.truth import write_test_archive
from workers.books.runs import RunStore
from workers.keys import Keys
from workers.sink.dataset import open_dataset

pytestmark = pytest.mark.timeout(180)
KEY_ID, SECRET = "ctlid", "ctl-secret-0123456789"
IMAGES = 240


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with start_server(ServerConfig(keys=f"{KEY_ID}:{SECRET}", latency_ms=100)) as srv:
        yield srv


def _calls(server: RunningServer) -> int:
    return int(httpx.get(f"{server.url}/__carnumber/stats").json()["accepted_total"])


def _env(server: RunningServer, redis_url: str, key_prefix: str, tmp: Path) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "CARNUMBER_ENDPOINT": server.url,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET,
        "CARNUMBER_OUTPUT": str(tmp / "out"),
        "CARNUMBER_QUEUE": f"{key_prefix}-queue",
        "CARNUMBER_KEY_PREFIX": key_prefix,
        "CARNUMBER_QPS": "30",  # a send deadline per call: a stalled process cannot send late
        "CARNUMBER_CHUNK_SIZE": "20",
        "CARNUMBER_CONCURRENCY": "4",
    }


@pytest.fixture
def world(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[dict[str, str], Child, RunStore]]:
    write_test_archive(tmp_path / "archive", IMAGES, distinct=40)
    env = _env(server, redis_url, key_prefix, tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    worker = start_worker(env, concurrency=2, hostname="ctl@%h")
    client = redis.Redis.from_url(redis_url)
    try:
        yield env, worker, RunStore(client, Keys(key_prefix))
    finally:
        worker.stop()
        client.close()


def _wait(what: str, ok, timeout_s: float = 90.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _exactly_once(env: dict[str, str], run_id: str) -> None:
    assert cli(["compact", run_id]) == 0
    rows = open_dataset(env["CARNUMBER_OUTPUT"]).read_run(run_id).to_pylist()
    ids = [r["image_id"] for r in rows if r["plate_index"] in (0, None)]
    assert len(ids) == IMAGES and len(set(ids)) == IMAGES


def test_pause_stops_the_run_s_calls_and_resume_finishes_it(
    world: tuple[dict[str, str], Child, RunStore], server: RunningServer, tmp_path: Path
) -> None:
    env, _worker, runs = world
    assert cli(["enqueue", str(tmp_path / "archive"), "--run", "p1"]) == 0
    _wait("some images written", lambda: (s := runs.get("p1")) is not None and s.written >= 40)
    assert cli(["pause", "p1"]) == 0
    at_return = _calls(server)
    time.sleep(3)
    assert _calls(server) == at_return  # nothing new sent after the command returned
    _wait("the run parked", lambda: (s := runs.get("p1")) is not None and s.outstanding == 0)
    summary = runs.get("p1")
    assert summary is not None and summary.state == "paused" and 0 < summary.parked < IMAGES

    # Another run of the same account goes on while p1 is paused.
    assert cli(["enqueue", str(tmp_path / "archive"), "--run", "p2", "--reprocess", "--wait"]) == 0
    still = runs.get("p1")
    assert still is not None and (still.state, still.written) == ("paused", summary.written)

    assert cli(["resume", "p1"]) == 0
    assert cli(["status", "p1", "--follow"]) == 0
    _exactly_once(env, "p1")
    _exactly_once(env, "p2")
    assert _calls(server) == 2 * IMAGES  # paused images were parked, not failed, and called once


def test_cancel_takes_queued_chunks_off_and_resume_needs_force(
    world: tuple[dict[str, str], Child, RunStore], server: RunningServer, tmp_path: Path
) -> None:
    env, _worker, runs = world
    assert cli(["enqueue", str(tmp_path / "archive"), "--run", "c1"]) == 0
    _wait("some images written", lambda: (s := runs.get("c1")) is not None and s.written >= 20)
    assert cli(["cancel", "c1"]) == 0
    at_return = _calls(server)
    assert runs.r.llen(env["CARNUMBER_QUEUE"]) == 0  # the run's queued chunks are off the broker
    time.sleep(3)
    assert _calls(server) == at_return
    _wait("the run parked", lambda: (s := runs.get("c1")) is not None and s.outstanding == 0)
    summary = runs.get("c1")
    assert summary is not None and summary.state == "cancelled"
    assert summary.written + summary.parked == IMAGES

    assert cli(["resume", "c1"]) == 2  # refused: cancelled
    assert cli(["resume", "c1", "--force"]) == 0
    assert cli(["status", "c1", "--follow"]) == 0
    _exactly_once(env, "c1")
