"""Byte-identical pictures anywhere in a run are called once (issue: never pay twice for the same
picture): across chunks, sources and worker processes racing on them, with real Redis, the real
engine and the local server; and by ETag + size for objects passed to the API by URL (moto's S3
server). Every copy keeps its own rows, with the shared answer, its ``content_key`` and the image
whose call answered it (``answered_by``); DuckDB reads the new columns without options."""

from __future__ import annotations

import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import duckdb
import httpx
import pytest
from helpers.s3_server import moto_s3, s3_client

from ocrserver.config import ServerConfig
from ocrserver.server import RunningServer, start_server
from ocrserver.truth import make_test_image
from workers.config import Settings
from workers.message import Chunk, ImageRef
from workers.runner import Runtime, execute_chunk
from workers.storage.uris import object_uri

pytestmark = pytest.mark.timeout(120)
KEY_ID, SECRET = "dupid", "dup-secret-0123456789"
PICTURES = 12


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with start_server(ServerConfig(keys=f"{KEY_ID}:{SECRET}", latency_ms=40)) as srv:
        yield srv


def _calls(server: RunningServer) -> int:
    return int(httpx.get(f"{server.url}/__carnumber/stats").json()["accepted_total"])


def _settings(server: RunningServer, redis_url: str, key_prefix: str, tmp: Path, **extra: str) -> Settings:
    return Settings.from_env(
        {
            "CARNUMBER_ENDPOINT": server.url,
            "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET,
            "REDIS_URL": redis_url,
            "CARNUMBER_KEY_PREFIX": key_prefix,
            "CARNUMBER_OUTPUT": str(tmp / "out"),
            "CARNUMBER_QPS": "0",
            "CARNUMBER_CONCURRENCY": "4",
            **extra,
        }
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
    rts[0].runs.set_state("d1", "running")
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
            rt.runs.set_state("d2", "running")
            result = execute_chunk(Chunk("d2", "0000000", refs[:3]), rt)
            again = execute_chunk(Chunk("d2", "0000001", refs[3:]), rt)
            rows = rt.dataset.read_run("d2").to_pylist()
    assert result.calls == 3 and again.calls == 0 and again.journalled == 3
    assert _calls(server) == 3
    assert {r["content_key"].split(":")[0] for r in rows} == {"etag"}
    assert len({r["image_id"] for r in rows}) == 6
