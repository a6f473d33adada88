"""``carnumber report``: outcomes (one per image, a retry's answer beats the first pass's failure),
failures by code with retryable and a hint, plates by type, calls from the run hash, throttles
from the per-minute counters, rate against the limit, duration, cost, ``--json`` and the failures
CSV; read from real Parquet parts and a real Redis."""

from __future__ import annotations

import argparse
import csv
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from carnumber.commands import report as report_cmd
from carnumber.report import hint
from tests.helpers.books import answer
from workers.api.response import Plate, Recognition
from workers.books.runs import RunStore
from workers.keys import Keys, account_tag
from workers.message import Chunk, ImageRef
from workers.metrics import CallCounter
from workers.sink.dataset import open_dataset
from workers.sink.rows import Failure, failure_rows, recognition_rows

KEY_ID = "LTAI-report-test"
POLY = ((1, 2), (3, 4), (5, 6), (7, 8))


def _rec(*plates: tuple[str, str]) -> Recognition:
    return Recognition("rid", tuple(Plate(t, 0.9, kind, 0.8, POLY) for t, kind in plates), 64, 48, 64, 48)


@pytest.fixture
def seeded(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
    redis_client: redis.Redis,
    key_prefix: str,
) -> Path:
    out = tmp_path / "out"
    for name, value in {
        "REDIS_URL": redis_url,
        "CARNUMBER_KEY_PREFIX": key_prefix,
        "CARNUMBER_OUTPUT": str(out),
        "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
        "CARNUMBER_QPS": "10",
        "CARNUMBER_PRICE_PER_1000_CALLS": "1.5",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CARNUMBER_CONFIG", raising=False)
    ds = open_dataset(str(out))
    now = datetime.now(UTC)
    t0 = now - timedelta(seconds=20)
    refs = [ImageRef(f"file:///cams/{i}.jpg") for i in range(6)]
    rows = (
        recognition_rows("r", refs[0], _rec(("京A1", "小型汽车"), ("京A2", "大型汽车")), 1, t0)
        + recognition_rows("r", refs[1], _rec(("京A3", "小型汽车")), 2, t0)
        + recognition_rows("r", refs[2], _rec(), 1, t0)
        + failure_rows("r", refs[3], Failure("InternalError", "boom", True), 6, t0)
        + failure_rows("r", refs[4], Failure("InternalError", "boom", True), 6, t0)
        + failure_rows("r", refs[5], Failure("local.unsupportedFormat", "a PDF", False), 0, t0)
    )
    ds.write_part("r", Chunk("r", "0000000", tuple(refs)).part_name, rows)
    # retry-failures: image 4 answered 10 s later (its earlier failure no longer counts)
    retry = recognition_rows("r", refs[4], _rec(("沪B9", "小型汽车")), 1, now - timedelta(seconds=10))
    ds.write_part("r", Chunk("r", "retry1-0000000", (refs[4],)).part_name, retry)

    store = RunStore(redis_client, Keys(key_prefix))
    store.create("r", "/cams")
    redis_client.hset(Keys(key_prefix).run("r"), "created_at", time.time() - 30)
    store.mark_enqueued("r", "0000000", "d", 6)
    answer(store, "r", "0000000", 6, failed=3, plates=4)
    store.touch("r", calls=18)
    # counted while the run ran (15 s ago), as workers count each call before its row is written
    counter = CallCounter(redis_client, Keys(key_prefix), account_tag(KEY_ID), clock=lambda: time.time() - 15)
    for code in ("ok", "ok", "Throttling.User", "Throttling.User"):
        counter.record(code, 0.1)
    counter.flush()
    return out


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    report_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_report_json_and_failures_csv(
    seeded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path = tmp_path / "failed.csv"
    assert report_cmd.main(_args("r", "--json", "--failures", str(csv_path))) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["images"] == 6 and data["state"] == "done" and data["source"] == "/cams"
    assert data["by_outcome"] == {"ok": 3, "no_plate": 1, "failed": 2}
    assert [(f["code"], f["images"], f["retryable"]) for f in data["failures"]] == [
        ("InternalError", 1, True),
        ("local.unsupportedFormat", 1, False),
    ]
    assert all(f["hint"] for f in data["failures"])
    assert data["plates"] == 4 and data["plates_by_type"] == {"小型汽车": 3, "大型汽车": 1}
    assert data["calls"] == 18 and data["calls_per_image"] == pytest.approx(3.0)
    assert data["throttled"] == 2
    assert data["qps_limit"] == 10 and 15 <= data["duration_s"] <= 25  # created -30 s, last answer -10 s
    assert data["calls_per_s"] == pytest.approx(18 / data["duration_s"])
    assert data["cost"] == pytest.approx(0.027)
    with csv_path.open(newline="", encoding="utf-8") as fh:
        failed = list(csv.DictReader(fh))
    assert sorted((r["source"], r["code"], r["retryable"]) for r in failed) == [
        ("file:///cams/3.jpg", "InternalError", "true"),
        ("file:///cams/5.jpg", "local.unsupportedFormat", "false"),
    ]
    assert set(failed[0]) == {"image_id", "source", "code", "message", "retryable"}


def test_report_text(seeded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_cmd.main(_args("r")) == 0
    out = capsys.readouterr().out
    assert out.startswith("carnumber report r (done; source /cams)")
    for want in (
        "images     6 with an outcome of 6 enqueued",
        "failed            2   33.3%",
        "InternalError                 1  retryable  a service-side error",
        "local.unsupportedFormat       1  final",
        "plates     4: 小型汽车 3, 大型汽车 1",
        "calls      18 (3.00 per image); throttled answers: 2",
        "calls/s achieved against the limit 10",
        "cost       0.03 (1.5 per 1000 calls)",
    ):
        assert want in out, (want, out)


def test_unknown_run_is_an_input_error(seeded: Path) -> None:
    from workers.errors import InputError

    with pytest.raises(InputError):
        report_cmd.main(_args("nosuchrun"))


def test_hints_cover_code_families() -> None:
    assert "CARNUMBER_QPS" in hint("Throttling.Api")
    assert hint("illegalImageUrl") == hint("IllegalImageUrl")
    assert hint("SomethingNew") == ""
