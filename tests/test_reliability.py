"""Reliability at small size (the scenarios of ``ops/bench/reliability.py``): real local server with
seeded faults on loopback, real Redis, real Parquet.

* Faults (10 % 503, 5 % throttles, 2 % hung calls, 1 % resets, 1 % malformed bodies): two workers
  (threads, each with its own runtime, as two processes would be) share the chunks; afterwards
  no image is missing, no ``(image_id, plate_index)`` row is written twice, not even across part
  files before compaction, every image's ``attempts`` is within ``max_attempts``, and the calls
  the server saw are exactly the attempts written down.
* Wrong secret: two workers start a chunk each at the same moment; the server sees at most the
  calls in flight (2 x concurrency) plus one per worker, nothing is marked failed, every image is
  parked and the run names ``SignatureDoesNotMatch``. Then ``carnumber resume`` and a real Celery
  worker with the right secret finish the run with every image exactly once.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from carnumber.cli import main as cli
from carnumber.localstack import start_worker
from ocrserver.config import ServerConfig
from ocrserver.faults import FaultConfig
from ocrserver.server import RunningServer, start_server
from ocrserver.truth import distinct_copy, make_test_image
from producers.enqueue import enqueue
from workers.config import Settings
from workers.message import Chunk, ImageRef
from workers.runner import Runtime, execute_chunk
from workers.sink.compact import compact_run

pytestmark = pytest.mark.timeout(120)

KEY_ID, SECRET = "reliabid", "reliab-secret-0123456789"
# The rates. Seed 4 draws every kind within the first 300 calls (each image makes one).
FAULTS = FaultConfig(
    rate_503=0.10, rate_throttle=0.05, rate_hang=0.02, rate_reset=0.01, rate_malformed=0.01, hang_s=3.0
)
SEED = 4
IMAGES, CHUNK, CONCURRENCY, WORKERS, MAX_ATTEMPTS = 300, 50, 8, 2, 6


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with start_server(ServerConfig(keys=f"{KEY_ID}:{SECRET}", faults=FAULTS, seed=SEED)) as srv:
        yield srv


def _stats(server: RunningServer) -> dict[str, Any]:
    return httpx.get(f"{server.url}/__carnumber/stats").json()


def _archive(folder: Path) -> list[ImageRef]:
    """300 files over 30 pictures: one plate, two plates (every 10th) or none (every 15th); each
    file has bytes of its own, so each is called (copies of one picture would be called once)."""
    folder.mkdir()
    refs = []
    pool: list[bytes] = []
    for i in range(IMAGES):
        k = i % 30
        if k % 15 == 14:
            plates: list[dict[str, str]] = []
        elif k % 10 == 9:
            plates = [{"text": f"苏E{k:05d}"}, {"text": f"浙A{k:05d}"}]
        else:
            plates = [{"text": f"苏E{k:05d}"}]
        if i < 30:
            pool.append(make_test_image(plates))
        path = folder / f"img-{i:04d}.png"
        path.write_bytes(distinct_copy(pool[k], i))
        refs.append(ImageRef(path.as_uri()))
    return refs


def _env(server: RunningServer, redis_url: str, key_prefix: str, tmp: Path, secret: str) -> dict[str, str]:
    return {
        "CARNUMBER_ENDPOINT": server.url,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": secret,
        "REDIS_URL": redis_url,
        "CARNUMBER_KEY_PREFIX": key_prefix,
        "CARNUMBER_QUEUE": f"{key_prefix}:queue",
        "CARNUMBER_OUTPUT": str(tmp / "out"),
        "CARNUMBER_QPS": "0",
        "CARNUMBER_CHUNK_SIZE": str(CHUNK),
        "CARNUMBER_CONCURRENCY": str(CONCURRENCY),
        "CARNUMBER_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        # Hung calls cost 0.5 s, not minutes; backoff scaled down (same full-jitter policy).
        "CARNUMBER_READ_TIMEOUT_S": "0.5",
        "CARNUMBER_RETRY_BASE_S": "0.05",
        "CARNUMBER_RETRY_CAP_S": "0.5",
    }


def _enqueue(rt: Runtime, run_id: str, refs: list[ImageRef]) -> queue.Queue[Chunk]:
    """The producer's real bookkeeping, into an in-memory queue instead of the broker."""
    chunks: queue.Queue[Chunk] = queue.Queue()
    rt.runs.create(run_id, "test")
    report = enqueue(
        refs,
        run_id,
        runs=rt.runs,
        publish=chunks.put,
        queue_depth=chunks.qsize,
        chunk_size=CHUNK,
        queue_high_water=100,
    )
    rt.runs.touch(run_id)
    assert report.images_enqueued == IMAGES
    return chunks


def _two_workers(env: dict[str, str], chunks: queue.Queue[Chunk]) -> None:
    """Two workers, each its own runtime (Redis connections, HTTP pool), start together and take
    chunks until none are left, as two worker processes take messages."""
    start = threading.Barrier(WORKERS)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with Runtime.from_settings(Settings.from_env(env)) as rt:
                start.wait(10)
                while True:
                    try:
                        chunk = chunks.get_nowait()
                    except queue.Empty:
                        return
                    execute_chunk(chunk, rt)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)


def _assert_every_image_once(rt: Runtime, run_id: str, refs: list[ImageRef]) -> list[dict[str, Any]]:
    """Before and after compaction: no duplicate row, one outcome per image, none missing."""
    before = rt.dataset.read_run(run_id, columns=["image_id", "plate_index", "status"]).to_pylist()
    keys = Counter((r["image_id"], r["plate_index"]) for r in before)
    assert [k for k, n in keys.items() if n > 1] == []  # across every part file
    outcomes = {(r["image_id"], r["status"] == "failed") for r in before}
    assert len(outcomes) == len({r["image_id"] for r in before})  # never answered and failed
    compact_run(rt.dataset, run_id)
    rows = rt.dataset.read_run(run_id).to_pylist()
    assert Counter((r["image_id"], r["plate_index"]) for r in rows) == keys
    assert {r["image_id"] for r in rows} == {r.image_id for r in refs}
    return rows


def _per_image(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["image_id"]: r for r in rows}


def test_faults_leave_every_image_exactly_once_within_max_attempts(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    refs = _archive(tmp_path / "archive")
    env = _env(server, redis_url, key_prefix, tmp_path, SECRET)
    rt = Runtime.from_settings(Settings.from_env(env))
    _two_workers(env, _enqueue(rt, "faults", refs))
    stats = _stats(server)

    assert set(stats["faults"]) == {"503", "throttle", "hang", "reset", "malformed"}
    summary = rt.runs.get("faults")
    assert summary is not None
    assert (summary.state, summary.written, summary.parked) == ("done", IMAGES, 0)
    rows = _assert_every_image_once(rt, "faults", refs)
    images = _per_image(rows)
    attempts = [r["attempts"] for r in images.values()]
    assert min(attempts) >= 1 and max(attempts) <= MAX_ATTEMPTS
    assert max(attempts) > 1  # faults were retried, not written as failures
    # Every call the server received is an attempt written down, and counted once in the run.
    assert sum(attempts) == stats["requests_total"] == int(summary.fields["calls"])
    failed = [r for r in images.values() if r["status"] == "failed"]
    # Out of attempts, or an unreadable answer at the second call or later (retried once only).
    unreadable = [r for r in failed if r["error_code"] == "local.unreadableAnswer"]
    assert all(r["retryable"] and r["attempts"] >= 2 for r in unreadable)
    assert all(r["retryable"] and r["attempts"] == MAX_ATTEMPTS for r in failed if r not in unreadable)
    assert len(failed) == int(summary.fields["images_failed"]) <= 3
    plates = {r["plate"] for r in rows if r["status"] == "ok"}
    assert len(plates) == 28 + 2  # 28 pictures with a plate, 2 of them with a second one


def test_wrong_secret_stops_within_the_calls_in_flight_then_resume_finishes(
    server: RunningServer,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refs = _archive(tmp_path / "archive")
    wrong = _env(server, redis_url, key_prefix, tmp_path, "not-the-secret")
    rt = Runtime.from_settings(Settings.from_env(wrong))
    chunks = _enqueue(rt, "badkey", refs)
    _two_workers(wrong, chunks)
    stats = _stats(server)

    bound = WORKERS * CONCURRENCY + WORKERS
    assert 1 <= stats["requests_total"] <= bound
    assert stats["answers"] == {"SignatureDoesNotMatch": stats["requests_total"]}
    summary = rt.runs.get("badkey")
    assert summary is not None
    assert summary.state == "stopped" and summary.fields["stop_code"] == "SignatureDoesNotMatch"
    assert summary.enqueued == summary.parked == IMAGES
    assert summary.written == int(summary.fields.get("images_failed", 0)) == 0
    assert rt.dataset.read_run("badkey").num_rows == 0

    # The operator fixes the secret, restarts the workers and resumes the run.
    right = _env(server, redis_url, key_prefix, tmp_path, SECRET)
    for k, v in right.items():
        monkeypatch.setenv(k, v)
    worker = start_worker(right, concurrency=WORKERS, hostname=f"reliab-{key_prefix[-6:]}@%h")
    try:
        assert cli(["resume", "badkey"]) == 0
        assert cli(["status", "badkey", "--follow"]) == 0
    finally:
        worker.stop()
    summary = rt.runs.get("badkey")
    assert summary is not None
    assert (summary.state, summary.written, summary.parked) == ("done", IMAGES, 0)
    rows = _assert_every_image_once(rt, "badkey", refs)
    attempts = [r["attempts"] for r in _per_image(rows).values()]
    assert max(attempts) <= MAX_ATTEMPTS
    calls = _stats(server)["requests_total"] - stats["requests_total"]
    assert sum(attempts) == calls  # the refused calls were not counted as attempts of any row
