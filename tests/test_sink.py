"""The Parquet sink: one row per plate, atomic parts, redelivery overwrites, compaction."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq

from workers.api.response import Plate, Recognition
from workers.message import Chunk, ImageRef
from workers.sink.compact import compact_run
from workers.sink.dataset import open_dataset
from workers.sink.failures import retryable_failures
from workers.sink.rows import Failure, failure_rows, recognition_rows

T0 = datetime(2026, 11, 24, tzinfo=UTC)
POLY = ((1, 2), (3, 4), (5, 6), (7, 8))


def _rec(*texts: str) -> Recognition:
    plates = tuple(Plate(t, 0.9, "小型汽车", 0.8, POLY) for t in texts)
    return Recognition("rid", plates, 640, 480, 640, 480)


def test_rows_per_plate_no_plate_and_failure() -> None:
    ref = ImageRef("https://h/x.jpg?Signature=s&v=1", meta={"camera": "c7"})
    two = recognition_rows("r", ref, _rec("京A12345", "沪B77777"), attempts=2, now=T0)
    assert [r["plate"] for r in two] == ["京A12345", "沪B77777"]
    assert two[0]["source"] == "https://h/x.jpg?v=1"  # no signature in output
    assert two[0]["polygon"][2] == {"x": 5, "y": 6}
    none = recognition_rows("r", ref, _rec(), attempts=1, now=T0)
    assert [r["status"] for r in none] == ["no_plate"]
    failed = failure_rows("r", ref, Failure("InternalError", "boom", True), attempts=6, now=T0)
    assert failed[0]["status"] == "failed" and failed[0]["retryable"] and failed[0]["attempts"] == 6


def test_redelivered_chunk_overwrites_its_part_and_readers_need_no_options(tmp_path: Path) -> None:
    ds = open_dataset(str(tmp_path / "out"))
    refs = tuple(ImageRef(f"file:///a/{i}.jpg", meta={"camera": "c1"}) for i in range(3))
    chunk = Chunk("night1", "0000000", refs)
    rows = [row for ref in refs for row in recognition_rows("night1", ref, _rec("京A12345"), 1, T0)]
    ds.write_part("night1", chunk.part_name, rows)
    ds.write_part("night1", chunk.part_name, rows)  # the same message delivered twice
    run_dir = ds.run_dir("night1")
    assert len(ds.parquet_files(run_dir)) == 1
    assert pq.read_table(run_dir).num_rows == 3
    assert len(pd.read_parquet(tmp_path / "out")) == 3
    assert duckdb.sql(f"SELECT count(*) FROM '{tmp_path}/out/**/*.parquet'").fetchall() == [(3,)]
    cameras = duckdb.sql(f"SELECT DISTINCT meta['camera'] FROM '{run_dir}/*.parquet'").fetchall()
    assert cameras == [("c1",)]


def test_compaction_keeps_one_outcome_per_image(tmp_path: Path) -> None:
    ds = open_dataset(str(tmp_path / "out"))
    a, b, c = (ImageRef(f"file:///a/{n}.jpg") for n in "abc")
    # First pass: a answered (two plates), b failed retryably, c failed for good.
    first = Chunk("r", "0000000", (a, b, c))
    ds.write_part(
        "r",
        first.part_name,
        recognition_rows("r", a, _rec("京A11111", "京A22222"), 1, T0)
        + failure_rows("r", b, Failure("ServiceUnavailable", "down", True), 6, T0)
        + failure_rows("r", c, Failure("unsupportedImageFormat", "pdf", False), 1, T0),
    )
    assert [r.image_id for r in retryable_failures(ds, "r")] == [b.image_id]
    # retry-failures: b answered later.
    retry = Chunk("r", "retry1-0000000", (b,))
    ds.write_part(
        "r", retry.part_name, recognition_rows("r", b, _rec(), 1, T0 + timedelta(hours=1))
    )
    assert retryable_failures(ds, "r") == []
    report = compact_run(ds, "r", rows_per_file=2)
    assert (report.parts_in, report.images, report.rows_out) == (2, 3, 4)
    assert report.files_out == 2
    table = ds.read_run("r").to_pylist()
    by_image = {}
    for row in table:
        by_image.setdefault(row["image_id"], []).append(row["status"])
    assert by_image == {a.image_id: ["ok", "ok"], b.image_id: ["no_plate"], c.image_id: ["failed"]}
    assert not list((tmp_path / "out").glob(".*"))  # no staging or old dirs left behind
    # Compacting again changes nothing.
    again = compact_run(ds, "r")
    assert (again.images, again.rows_out) == (3, 4)
