"""Never pay twice for the same picture, with real Redis, the real engine and the local server.

Within a run: byte-identical pictures anywhere are called once, across chunks, sources and
worker processes racing on them, and by ETag + size for objects passed to the API by URL (moto's
S3 server). Every copy keeps its own rows, with the shared answer, its ``content_key`` and the
image whose call answered it (``answered_by``); DuckDB reads the new columns without options.

Across runs: a picture answered in an earlier run is not paid for again wherever it has moved:
the producer's index update (``producers/answer_index.py``) and the workers' lookups
(``workers/earlier.py``) on several runtimes at once and real worker processes, with outputs on
local disk and on S3. ``--reprocess`` calls again; ``carnumber plan`` counts what the run does."""

from __future__ import annotations

import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest
from helpers.s3_server import moto_s3, s3_client

from carnumber.report import build_report
from ocrserver.config import ServerConfig
from ocrserver.server import RunningServer, start_server
from ocrserver.truth import make_test_image
from producers.answer_index import update_answers
from producers.plan import make_plan, plan_items
from workers.answer_cache import AnswerCache
from workers.api.response import Plate, Recognition
from workers.config import Settings
from workers.earlier import REUSE_FIELD, UPDATED_FIELD
from workers.message import Chunk, ImageRef
from workers.pipeline import ChunkResult
from workers.runner import Runtime, execute_chunk
from workers.sink.dataset import open_dataset
from workers.sink.rows import recognition_from_rows, recognition_rows
from workers.storage.uris import object_uri

pytestmark = pytest.mark.timeout(180)
KEY_ID, SECRET = "dupid", "dup-secret-0123456789"
PICTURES = 12


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with start_server(ServerConfig(keys=f"{KEY_ID}:{SECRET}", latency_ms=40)) as srv:
        yield srv


def _calls(server: RunningServer) -> int:
    return int(httpx.get(f"{server.url}/__carnumber/stats").json()["accepted_total"])


def _env(server: RunningServer, redis_url: str, key_prefix: str, tmp: Path, **extra: str) -> dict[str, str]:
    return {
        "CARNUMBER_ENDPOINT": server.url,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET,
        "REDIS_URL": redis_url,
        "CARNUMBER_KEY_PREFIX": key_prefix,
        "CARNUMBER_OUTPUT": str(tmp / "out"),
        "CARNUMBER_QPS": "0",
        **extra,
    }


def _settings(server: RunningServer, redis_url: str, key_prefix: str, tmp: Path, **extra: str) -> Settings:
    return Settings.from_env(_env(server, redis_url, key_prefix, tmp, CARNUMBER_CONCURRENCY="4", **extra))


def _worker_env(
    server: RunningServer, redis_url: str, key_prefix: str, tmp: Path, chunk_size: int
) -> dict[str, str]:
    """For real worker processes and the CLI: :func:`_env` with the test's own queue."""
    queue = f"{key_prefix}:queue"
    return _env(
        server, redis_url, key_prefix, tmp, CARNUMBER_QUEUE=queue, CARNUMBER_CHUNK_SIZE=str(chunk_size)
    )


def test_copies_across_chunks_sources_and_workers_are_called_once(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    pictures = [make_test_image([{"text": f"苏E{i:05d}"}]) for i in range(PICTURES)]
    folder, copies = tmp_path / "cam", tmp_path / "copies"
    folder.mkdir()
    copies.mkdir()
    for i, data in enumerate(pictures):
        (folder / f"a-{i:02d}.png").write_bytes(data)
        (copies / f"b-{i:02d}.png").write_bytes(data)  # the same camera frame uploaded twice
    tar = tmp_path / "repacked.tar"
    with tarfile.open(tar, "w") as tf:  # and the archive re-packed into a tar
        tf.add(folder, arcname="night")
    refs_a = [ImageRef((folder / f"a-{i:02d}.png").as_uri()) for i in range(PICTURES)]
    refs_b = [ImageRef((copies / f"b-{i:02d}.png").as_uri()) for i in range(PICTURES)]
    refs_t = [ImageRef(f"tar://{tar}#night/a-{i:02d}.png") for i in range(PICTURES)]
    chunks = [
        Chunk("d1", "0000000", tuple(refs_a)),
        Chunk("d1", "0000001", tuple(refs_b)),
        Chunk("d1", "0000002", tuple(refs_t)),
        Chunk("d1", "0000003", tuple(refs_a[:4] + refs_b[4:8])),  # an overlap inside one chunk too
    ]
    settings = _settings(server, redis_url, key_prefix, tmp_path)
    rts = [Runtime.from_settings(settings) for _ in range(3)]  # three worker processes
    rts[0].runs.create("d1", "test")
    for c in chunks:
        rts[0].runs.mark_enqueued("d1", c.chunk_id, c.part_name, len(c.images))
    rts[0].runs.touch("d1")
    try:
        threads = [
            threading.Thread(target=execute_chunk, args=(c, rts[i % len(rts)])) for i, c in enumerate(chunks)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert _calls(server) == PICTURES  # one call per distinct picture, whatever raced
        rows = rts[0].dataset.read_run("d1").to_pylist()
        report = build_report(rts[0].dataset, "d1", {}, qps_limit=0)
        assert (report.copies_in_run, report.answered_earlier) == (2 * PICTURES, 0)
    finally:
        for rt in rts:
            rt.close()
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    every = {r.image_id for r in refs_a + refs_b + refs_t}
    assert set(by_image) == every  # every listed image has its own rows
    keys = {r["content_key"] for r in rows}
    assert len(keys) == PICTURES and all(k.startswith("sha256:") for k in keys)
    callers = {r["answered_by"] for r in rows}
    assert len(callers) == PICTURES and callers <= every  # one answering image per picture
    plates = {(r["content_key"], r["plate"]) for r in rows}
    assert len(plates) == PICTURES  # every copy carries its picture's answer
    # Attempts are the calls made for the image: one for the image that paid, none for a copy.
    assert {(r["answered_by"] == r["image_id"], r["attempts"]) for r in rows} == {(True, 1), (False, 0)}
    out = duckdb.sql(
        f"SELECT count(DISTINCT content_key), count(DISTINCT image_id), count(*) FILTER (WHERE "
        f"answered_by <> image_id) FROM '{tmp_path / 'out'}/run=d1/*.parquet'"
    ).fetchall()[0]
    assert out[0] == PICTURES and out[1] == 3 * PICTURES and out[2] >= 2 * PICTURES


def test_objects_in_url_mode_are_deduplicated_by_etag_and_size(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    # Big enough (~38 KB) that the Url-mode checks read only the head and tail, not the bytes.
    data = [make_test_image([{"text": f"浙A{i:05d}"}], width=1600, height=1200) for i in range(3)]
    with moto_s3() as endpoint:
        s3 = s3_client(endpoint)
        s3.create_bucket(Bucket="cams")
        keys = []
        for prefix in ("2026-11-23/", "reorganised/north/"):  # a bucket re-listed under new prefixes
            for i, body in enumerate(data):
                s3.put_object(Bucket="cams", Key=f"{prefix}{i}.png", Body=body, ContentType="image/png")
                keys.append(f"{prefix}{i}.png")
        settings = _settings(
            server,
            redis_url,
            key_prefix,
            tmp_path,
            CARNUMBER_S3_ENDPOINT_URL=endpoint,
            CARNUMBER_S3_MODE="url",
        )
        with Runtime.from_settings(settings) as rt:
            rt.runs.create("d2", "test")
            refs = tuple(ImageRef(object_uri("s3", "cams", k)) for k in keys)
            rt.runs.mark_enqueued("d2", "0000000", "a", 3)
            rt.runs.mark_enqueued("d2", "0000001", "b", 3)
            rt.runs.touch("d2")
            result = execute_chunk(Chunk("d2", "0000000", refs[:3]), rt)
            again = execute_chunk(Chunk("d2", "0000001", refs[3:]), rt)
            rows = rt.dataset.read_run("d2").to_pylist()
    assert result.calls == 3 and again.calls == 0 and again.journalled == 3
    assert _calls(server) == 3
    assert {r["content_key"].split(":")[0] for r in rows} == {"etag"}
    assert len({r["image_id"] for r in rows}) == 6


# -- across runs ------------------------------------------------------------------------------


def _run(
    rts: list[Runtime], run_id: str, chunks: list[list[ImageRef]], *, reuse: bool = True
) -> list[ChunkResult]:
    """What the producer and the workers do for one run: its chunks on all runtimes at once."""
    runs = rts[0].runs
    runs.create(run_id, "test")
    todo = [Chunk(run_id, f"{i:07d}", tuple(refs)) for i, refs in enumerate(chunks)]
    for c in todo:
        runs.mark_enqueued(run_id, c.chunk_id, c.part_name, len(c.images))
    # As `carnumber enqueue` does: the run's setting, and the stamp of its cache update.
    runs.touch(run_id, **{REUSE_FIELD: "1" if reuse else "0", UPDATED_FIELD: time.time()})
    results: list[Any] = [None] * len(todo)

    def work(i: int) -> None:
        results[i] = execute_chunk(todo[i], rts[i % len(rts)])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(todo))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert all(r is not None for r in results)
    return results


def _pictures() -> list[bytes]:
    return [make_test_image([{"text": f"鲁B{i:05d}"}]) for i in range(PICTURES)]


def test_rows_give_back_the_recognition_they_were_written_from() -> None:
    rec = Recognition(
        "req-1",
        (Plate("浙A12345", 0.98, "蓝牌", 0.9, ((1, 2), (30, 2), (30, 12), (1, 12))), Plate("沪C1", 0.5)),
        width=640,
        height=480,
        org_width=1280,
        org_height=960,
    )
    ref = ImageRef("file:///x.png")
    assert recognition_from_rows(recognition_rows("r", ref, rec, 1)) == rec
    empty = Recognition("req-2", (), 10, 10, 10, 10)
    assert recognition_from_rows(recognition_rows("r", ref, empty, 1)) == empty


def test_a_second_run_over_moved_and_repacked_copies_makes_no_call(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    night, moved = tmp_path / "night", tmp_path / "reorganised" / "north"
    night.mkdir()
    moved.mkdir(parents=True)
    for i, data in enumerate(_pictures()):
        (night / f"cam-{i:02d}.png").write_bytes(data)
        (moved / f"frame-{i:02d}.png").write_bytes(data)  # the archive listed again under new paths
    tar = tmp_path / "repacked.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(night, arcname="again")
    first = [ImageRef((night / f"cam-{i:02d}.png").as_uri()) for i in range(PICTURES)]
    second = [ImageRef((moved / f"frame-{i:02d}.png").as_uri()) for i in range(PICTURES)]
    repacked = [ImageRef(f"tar://{tar}#again/cam-{i:02d}.png") for i in range(PICTURES)]
    output = str(tmp_path / "out")
    rts = [
        Runtime.from_settings(_settings(server, redis_url, key_prefix, tmp_path, CARNUMBER_OUTPUT=output))
        for _ in range(3)
    ]
    try:
        _run(rts, "n1", [first[:5], first[5:]])
        assert _calls(server) == PICTURES
        stats = update_answers(output)  # what `carnumber enqueue` does before the next run
        assert stats.entries == PICTURES and stats.files_ingested == 2

        results = _run(rts, "n2", [second[:4], second[4:] + repacked[:3], repacked[3:]])
        assert _calls(server) == PICTURES  # not one more call
        assert sum(r.reused for r in results) == 2 * PICTURES
        rows = rts[0].dataset.read_run("n2").to_pylist()
        old = rts[0].dataset.read_run("n1").to_pylist()
        report = build_report(rts[0].dataset, "n2", {}, qps_limit=0)  # the morning report says so
        assert (report.answered_earlier, report.copies_in_run, report.images) == (
            2 * PICTURES,
            0,
            2 * PICTURES,
        )

        # Again with --reprocess: every picture is called (once: copies within the run share).
        _run(rts, "n3", [second, repacked], reuse=False)
        assert _calls(server) == 2 * PICTURES
    finally:
        for rt in rts:
            rt.close()
    assert {r["image_id"] for r in rows} == {r.image_id for r in second + repacked}
    payer = {r["content_key"]: r["image_id"] for r in old}
    plate_of = {r["content_key"]: r["plate"] for r in old}
    for r in rows:
        assert r["answered_by"] == payer[r["content_key"]]  # the earlier run's image that paid
        assert r["plate"] == plate_of[r["content_key"]] and r["attempts"] == 0
    # The index update is incremental: run n2's three parts and n3's two, then nothing.
    assert update_answers(output).files_ingested == 5
    assert update_answers(output).files_ingested == 0


def test_plan_counts_moved_pictures_as_answered_and_the_run_agrees(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    night, moved = tmp_path / "night", tmp_path / "moved"
    night.mkdir()
    moved.mkdir()
    pictures = _pictures()
    for i, data in enumerate(pictures):
        (night / f"{i:02d}.png").write_bytes(data)
        if i < 6:
            (moved / f"old-{i:02d}.png").write_bytes(data)
    for i in range(3):  # and three pictures nobody has seen
        (moved / f"new-{i}.png").write_bytes(make_test_image([{"text": f"鲁F{i:05d}"}]))
    output = str(tmp_path / "out")
    settings = _settings(server, redis_url, key_prefix, tmp_path, CARNUMBER_OUTPUT=output)
    with Runtime.from_settings(settings) as rt:
        _run([rt], "p1", [[ImageRef((night / f"{i:02d}.png").as_uri()) for i in range(PICTURES)]])
        update_answers(output)
        with AnswerCache.beside(open_dataset(output)) as cache:
            report = make_plan(plan_items(str(moved), settings), settings, answers=cache)
        assert (report.listed, report.answered_earlier_by_content, report.calls) == (9, 6, 3)
        before = _calls(server)
        refs = [ImageRef(p.as_uri()) for p in sorted(moved.iterdir())]
        _run([rt], "p2", [refs])
        assert _calls(server) - before == report.calls


def test_an_output_on_s3_serves_the_next_run_of_a_reorganised_bucket(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    with moto_s3() as endpoint:
        s3 = s3_client(endpoint)
        for bucket in ("reuse-cams", "reuse-out"):
            s3.create_bucket(Bucket=bucket)
        big = [make_test_image([{"text": f"鲁K{i:05d}"}], width=1600, height=1200) for i in range(4)]
        for prefix in ("2026-11-30/", "by-camera/west/"):  # the same objects under new prefixes
            for i, body in enumerate(big):
                s3.put_object(Bucket="reuse-cams", Key=f"{prefix}{i}.png", Body=body, ContentType="image/png")
        host = endpoint.removeprefix("http://")
        output = f"s3://reuse-out/plates?endpoint_override={host}&scheme=http&region=us-east-1"
        settings = _settings(
            server,
            redis_url,
            key_prefix,
            tmp_path,
            CARNUMBER_OUTPUT=output,
            CARNUMBER_S3_ENDPOINT_URL=endpoint,
            CARNUMBER_S3_MODE="url",
        )
        refs = {
            p: [ImageRef(object_uri("s3", "reuse-cams", f"{p}{i}.png")) for i in range(4)]
            for p in ("2026-11-30/", "by-camera/west/")
        }
        with Runtime.from_settings(settings) as rt:
            _run([rt], "s1", [refs["2026-11-30/"]])
            assert _calls(server) == 4
            assert update_answers(output).entries == 4
            results = _run([rt], "s2", [refs["by-camera/west/"]])
            rows = rt.dataset.read_run("s2").to_pylist()
        assert _calls(server) == 4 and results[0].reused == 4
        assert {r["content_key"].split(":")[0] for r in rows} == {"etag"}
        assert len({r["image_id"] for r in rows}) == 4


def test_as_a_user_runs_it_with_real_workers_and_compaction_between(
    server: RunningServer,
    redis_url: str,
    redis_client: Any,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``carnumber enqueue --wait`` twice, two real worker processes, the first run compacted
    in between; then ``--reprocess``."""
    import shutil

    from carnumber.cli import main as cli
    from carnumber.localstack import start_worker
    from workers.books.runs import RunStore
    from workers.keys import Keys

    archive, moved = tmp_path / "archive", tmp_path / "moved"
    archive.mkdir()
    for i, data in enumerate(_pictures()):
        (archive / f"cam-{i:02d}.png").write_bytes(data)
    env = _worker_env(server, redis_url, key_prefix, tmp_path, chunk_size=3)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    workers = [
        start_worker(env, concurrency=2, hostname=f"reuse{i}-{key_prefix}@%h", extra=["--pool=threads"])
        for i in range(2)
    ]
    try:
        assert cli(["enqueue", str(archive), "--run", "r1", "--wait"]) == 0
        assert _calls(server) == PICTURES
        assert cli(["compact", "r1"]) == 0
        shutil.copytree(archive, moved / "renamed-by-the-new-camera-system")
        assert cli(["enqueue", str(moved), "--run", "r2", "--wait"]) == 0
        assert _calls(server) == PICTURES  # moved: answered from the cache, no call
        assert cli(["enqueue", str(moved), "--run", "r3", "--reprocess", "--wait"]) == 0
        assert _calls(server) == 2 * PICTURES
    finally:
        for w in workers:
            w.stop()
    runs = RunStore(redis_client, Keys(key_prefix))
    for run_id in ("r2", "r3"):
        summary = runs.get(run_id)
        assert summary is not None and summary.state == "done" and summary.written == PICTURES
    from workers.sink.dataset import open_dataset

    rows = open_dataset(env["CARNUMBER_OUTPUT"]).read_run("r2").to_pylist()
    assert len({r["image_id"] for r in rows}) == PICTURES and {r["attempts"] for r in rows} == {0}


def test_two_sources_enqueued_into_one_run_make_one_call_per_picture(
    server: RunningServer,
    redis_url: str,
    redis_client: Any,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``carnumber enqueue FOLDER --run R`` then ``carnumber enqueue ARCHIVE.tar --run R``: each
    source gets chunk ids of its own, copies across them are called once, enqueuing either again
    (by another spelling of its path, too) adds nothing, and ``carnumber verify`` passes."""
    from carnumber.cli import main as cli
    from carnumber.localstack import start_worker
    from workers.books.runs import RunStore
    from workers.keys import Keys

    folder = tmp_path / "cam"
    folder.mkdir()
    pictures = _pictures()
    for i, data in enumerate(pictures[:6]):
        (folder / f"{i:02d}.png").write_bytes(data)
    staging = tmp_path / "staging"
    staging.mkdir()
    for i, data in enumerate(pictures):  # the archive holds the folder's six again, and four more
        (staging / f"frame-{i:02d}.png").write_bytes(data)
    tar = tmp_path / "upload.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(staging, arcname="upload")
    env = _worker_env(server, redis_url, key_prefix, tmp_path, chunk_size=4)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    worker = start_worker(env, concurrency=2, hostname=f"two-{key_prefix}@%h", extra=["--pool=threads"])
    try:
        assert cli(["enqueue", str(folder), "--run", "two"]) == 0
        assert cli(["enqueue", str(tar), "--run", "two", "--wait"]) == 0
        assert cli(["enqueue", "cam", "--run", "two"]) == 0  # the folder again, by a relative path
        assert cli(["enqueue", str(tar), "--run", "two", "--wait"]) == 0
    finally:
        worker.stop()
    assert _calls(server) == PICTURES  # one call per distinct picture over both sources
    summary = RunStore(redis_client, Keys(key_prefix)).get("two")
    assert summary is not None and summary.enqueued == 6 + PICTURES and summary.state == "done"
    assert summary.fields["source"] == str(folder)  # the run's first source
    assert cli(["verify", "two"]) == 0
