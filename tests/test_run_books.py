"""The run's books and the operator commands over them (issue: commands and counters that lost
images silently or paid twice). Each test plays one scenario that failed before, with real
Redis, the real local server and, where the scenario needs one, a real Celery worker.

1. an enqueue held midway (pause, quota) exits non-zero, says what is left, and ``resume``
   finishes it; ``resume`` lifts a pause whatever the run's status says;
2. ``verify --republish`` on a live run republishes only what is lost, and nothing is paid twice;
4. ``resume`` forgets a parked chunk only once it is published again;
5. a chunk written in pieces, parked, then redelivered is counted once;
6. a claim that runs out while its image waits at the limiter is checked again before paying;
8. answers that reach no journal wait on disk and are not paid again;
9. a finished run's keys expire after the retention; dead processes leave the in-flight hash.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from carnumber.cli import main as cli
from carnumber.commands.status import line
from carnumber.localstack import Child, start_worker
from ocrserver.config import ServerConfig
from ocrserver.server import RunningServer, start_server
from ocrserver.truth import write_test_archive
from ops.drills.harness import DrillRedis
from tests.helpers.books import answer
from workers.books.queued import chunk_of, queued_messages
from workers.books.runs import RunStore
from workers.config import Settings
from workers.keys import Keys
from workers.message import Chunk, ImageRef
from workers.metrics import prune_in_flight, read_in_flight, write_in_flight
from workers.runner import Runtime, execute_chunk
from workers.sink.dataset import open_dataset

pytestmark = pytest.mark.timeout(180)
KEY_ID, SECRET = "booksid", "books-secret-0123456789"
IMAGES = 240


def _server(latency_ms: int) -> Iterator[RunningServer]:
    with start_server(ServerConfig(keys=f"{KEY_ID}:{SECRET}", latency_ms=latency_ms)) as srv:
        yield srv


@pytest.fixture
def server() -> Iterator[RunningServer]:
    yield from _server(150)


def _calls(server: RunningServer) -> int:
    return int(httpx.get(f"{server.url}/__carnumber/stats").json()["accepted_total"])


def _env(server: RunningServer, redis_url: str, key_prefix: str, tmp: Path, **extra: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "CARNUMBER_ENDPOINT": server.url,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET,
        "CARNUMBER_OUTPUT": str(tmp / "out"),
        "CARNUMBER_QUEUE": f"{key_prefix}-queue",
        "CARNUMBER_KEY_PREFIX": key_prefix,
        "CARNUMBER_QPS": "0",
        "CARNUMBER_CHUNK_SIZE": "20",
        "CARNUMBER_CONCURRENCY": "4",
        "CARNUMBER_SPILL_DIR": str(tmp / "spill"),
        **extra,
    }


def _wait(what: str, ok, timeout_s: float = 90.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _exactly_once(env: dict[str, str], run_id: str, images: int = IMAGES) -> None:
    assert cli(["compact", run_id]) == 0
    rows = open_dataset(env["CARNUMBER_OUTPUT"]).read_run(run_id).to_pylist()
    ids = [r["image_id"] for r in rows if r["plate_index"] in (0, None)]
    assert len(ids) == images and len(set(ids)) == images


@pytest.fixture
def world(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[dict[str, str], Child, RunStore]]:
    write_test_archive(tmp_path / "archive", IMAGES, distinct=IMAGES)
    env = _env(server, redis_url, key_prefix, tmp_path, CARNUMBER_QUEUE_HIGH_WATER="1")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    worker = start_worker(env, concurrency=2, hostname="books@%h")
    client = redis.Redis.from_url(redis_url)
    try:
        yield env, worker, RunStore(client, Keys(key_prefix))
    finally:
        worker.stop()
        client.close()


def test_an_enqueue_held_midway_says_so_exits_non_zero_and_resume_finishes_it(
    world: tuple[dict[str, str], Child, RunStore], server: RunningServer, tmp_path: Path
) -> None:
    env, _worker, runs = world
    archive = str(tmp_path / "archive")
    producer = subprocess.Popen(
        [sys.executable, "-m", "carnumber.cli", "enqueue", archive, "--run", "held"],
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait("some images written", lambda: (s := runs.get("held")) is not None and s.written >= 40)
    assert cli(["pause", "held"]) == 0  # while the producer still feeds the run (a queue of 1)
    out, err = producer.communicate(timeout=60)
    assert producer.returncode == 3, out + err
    assert "NOT FINISHED" in err and "carnumber resume held" in err
    _wait("the run parked", lambda: (s := runs.get("held")) is not None and s.outstanding == 0)
    summary = runs.get("held")
    assert summary is not None and summary.state == "paused" and summary.enqueued < IMAGES
    assert "NOT ENQUEUED TO ITS END" in line(runs, "held")
    assert cli(["verify", "held"]) == 1  # what was enqueued so far may be fine: the night is not

    # The producer's "done enqueuing" wrote nothing the operator's control depends on: resume
    # lifts the pause, publishes the parked chunks and enqueues the rest of the source.
    assert cli(["resume", "held"]) == 0
    assert cli(["status", "held", "--follow"]) == 0
    _exactly_once(env, "held")
    assert cli(["verify", "held"]) == 0
    assert _calls(server) == IMAGES


def _lose_one_queued_message(runs: RunStore, queue: str, run_id: str) -> Chunk:
    for raw in queued_messages(runs.r, queue):
        chunk = chunk_of(raw, run_id)
        if chunk is not None and runs.r.lrem(queue, 1, raw):
            return chunk
    raise AssertionError("no queued message to lose")


def test_verify_republish_on_a_live_run_republishes_only_what_is_lost(
    server: RunningServer,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_test_archive(tmp_path / "archive", IMAGES, distinct=IMAGES)
    env = _env(server, redis_url, key_prefix, tmp_path, CARNUMBER_CONCURRENCY="2")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    runs = RunStore(redis.Redis.from_url(redis_url), Keys(key_prefix))
    assert cli(["enqueue", str(tmp_path / "archive"), "--run", "live"]) == 0  # all queued first
    lost = _lose_one_queued_message(runs, env["CARNUMBER_QUEUE"], "live")  # e.g. Redis lost it
    worker = start_worker(env, concurrency=2, hostname="live@%h")
    try:
        _wait("a quarter written", lambda: (s := runs.get("live")) is not None and s.written >= IMAGES // 4)
        capsys.readouterr()
        assert cli(["verify", "live", "--republish"]) == 1  # the run is not done: not OK yet
        out = capsys.readouterr().out
        # Queued and in-flight images are alive: only the lost message's images go out again.
        assert f"re-published {len(lost.images)} missing images in 1 chunks" in out, out
        assert cli(["status", "live", "--follow"]) == 0
    finally:
        worker.stop()
    _exactly_once(env, "live")
    assert cli(["verify", "live"]) == 0
    assert _calls(server) == IMAGES  # nothing paid twice, the run not marked done early


def test_resume_forgets_a_parked_chunk_only_once_it_is_published_again(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.tasks

    for k, v in _env(server, redis_url, key_prefix, tmp_path).items():
        monkeypatch.setenv(k, v)
    runs = RunStore(redis.Redis.from_url(redis_url), Keys(key_prefix))
    runs.create("r4", "test")
    parked = [Chunk("r4", f"{k:07d}", (ImageRef(f"file:///cams/{k}.jpg"),)) for k in range(3)]
    for chunk in parked:
        runs.mark_enqueued("r4", chunk.chunk_id, "d", 1)
        runs.park(chunk, "quota_exhausted")
    published: list[Chunk] = []

    def publish_then_ctrl_c(chunk: Chunk, queue: str) -> None:
        published.append(chunk)
        if len(published) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(workers.tasks, "publish_chunk", publish_then_ctrl_c)
    assert cli(["resume", "r4"]) == 130
    assert [c for _, c in runs.parked("r4")] == parked[1:]  # published, or still parked
    monkeypatch.setattr(workers.tasks, "publish_chunk", lambda chunk, queue: published.append(chunk))
    assert cli(["resume", "r4"]) == 0
    assert runs.parked("r4") == [] and {c.chunk_id for c in published} == {c.chunk_id for c in parked}


def _runtime(env: dict[str, str], **changes: object) -> Runtime:
    return Runtime.from_settings(Settings.from_env(env).with_(**changes))


def _chunk(folder: Path, run_id: str, n: int) -> Chunk:
    write_test_archive(folder, n, distinct=n)
    return Chunk(run_id, "0000000", tuple(ImageRef(p.as_uri()) for p in sorted(folder.glob("*.png"))))


def test_a_chunk_parked_in_part_then_redelivered_is_counted_once(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    env = _env(server, redis_url, key_prefix, tmp_path, CARNUMBER_QUOTA_WINDOW="total")
    chunk = _chunk(tmp_path / "a", "r5", 10)
    with _runtime(env, quota=5) as rt:
        rt.runs.create("r5", "test")
        rt.runs.mark_enqueued("r5", chunk.chunk_id, "d", 10)
        first = execute_chunk(chunk, rt)  # the quota runs out halfway: 5 written, 5 parked
        assert (first.answered, len(first.pending)) == (5, 5)
        summary = rt.runs.get("r5")
        assert summary is not None and (summary.written, summary.parked) == (5, 5)
        assert summary.state == "quota_exhausted"
        [(_, remainder)] = rt.runs.parked("r5")
    with _runtime(env, quota=100) as rt:
        # The whole message again (its ack was lost), then the parked remainder (resumed).
        execute_chunk(chunk, rt)
        summary = rt.runs.get("r5")
        assert summary is not None and (summary.written, summary.parked, summary.state) == (10, 0, "done")
        assert rt.redis.hlen(rt.keys.run_answers("r5")) == 0  # dropped once done, not before
        assert execute_chunk(remainder, rt).calls == 0
        summary = rt.runs.get("r5")
        assert summary is not None and summary.written == 10
    assert _calls(server) == 10


def test_a_claim_that_runs_out_at_the_limiter_is_checked_again_before_paying(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.engine

    # 12 pictures x 3 copies behind 4 calls/s: the last picture's first copy waits 3 s for its
    # token, three times the claim; a copy claims the picture meanwhile and waits too.
    monkeypatch.setattr(workers.engine, "_claim_ms", lambda _settings: 1000)
    folder = tmp_path / "a"
    write_test_archive(folder, 12, distinct=12)
    pictures = sorted(folder.glob("*.png"))
    for copy in (1, 2):
        for p in pictures:
            (folder / f"copy{copy}-{p.name}").write_bytes(p.read_bytes())
    refs = tuple(ImageRef(p.as_uri()) for p in sorted(folder.glob("*.png")))
    assert len(refs) == 36
    env = _env(server, redis_url, key_prefix, tmp_path, CARNUMBER_QPS="4", CARNUMBER_CONCURRENCY="36")
    with _runtime(env) as rt:
        rt.runs.create("r6", "test")
        rt.runs.mark_enqueued("r6", "0000000", "d", 36)
        result = execute_chunk(Chunk("r6", "0000000", refs), rt)
    assert result.answered == 36 and _calls(server) == 12


@pytest.fixture
def slow_server() -> Iterator[RunningServer]:
    yield from _server(1500)


def test_answers_that_reach_no_journal_wait_on_disk_and_are_not_paid_again(
    slow_server: RunningServer, key_prefix: str, tmp_path: Path, own_redis: DrillRedis
) -> None:
    own = own_redis
    env = _env(slow_server, own.url, key_prefix, tmp_path, CARNUMBER_REDIS_OUTAGE_S="2")
    chunk = _chunk(tmp_path / "a", "r8", 4)
    with _runtime(env) as rt:
        rt.runs.create("r8", "test")
        rt.runs.mark_enqueued("r8", chunk.chunk_id, "d", 4)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                execute_chunk(chunk, rt)
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.7)  # the four calls are in flight
        own.stop()  # Redis goes away for longer than CARNUMBER_REDIS_OUTAGE_S
        worker.join(60)
        assert errors and isinstance(errors[0], redis.RedisError)  # the task would retry it
        assert _calls(slow_server) == 4
        spilled = [ln for p in (tmp_path / "spill").glob("*.jsonl") for ln in p.read_text().splitlines()]
        assert len(spilled) == 4
        own.start()
        execute_chunk(chunk, rt)  # the retry: the spilled answers are back in the journal first
        summary = rt.runs.get("r8")
        assert summary is not None and summary.state == "done"
    assert _calls(slow_server) == 4  # not paid again
    assert all(not p.read_text() for p in (tmp_path / "spill").glob("*.jsonl"))


def test_a_finished_run_s_keys_expire_and_dead_processes_leave_the_in_flight_hash(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    runs = RunStore(redis_client, keys)
    runs.create("r9", "test")
    runs.mark_enqueued("r9", "0000000", "d", 3)
    answer(runs, "r9", "0000000", 3)
    assert runs.settle("r9", retention_s=120)
    assert 0 < redis_client.ttl(keys.run("r9")) <= 120
    assert 0 < redis_client.ttl(keys.run_outcomes("r9")) <= 120
    redis_client.delete(keys.run("r9"))  # as when the retention runs out
    assert runs.prune() == 1 and "r9" not in runs.runs()

    now = time.time()
    write_in_flight(redis_client, keys, "acct", "host:1", 3, now - 3600)  # a process long gone
    write_in_flight(redis_client, keys, "acct", "host:2", 2, now)
    assert prune_in_flight(redis_client, keys, "acct", now) == 1
    assert redis_client.hkeys(keys.in_flight("acct")) == [b"host:2"]
    assert read_in_flight(redis_client, keys, "acct", now) == (2, 1)
