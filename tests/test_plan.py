"""``carnumber plan``: counts, the bill, and a call count equal to what a real run then makes."""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aredis
from helpers.s3_server import moto_s3, s3_client
from PIL import Image as PILImage

from carnumber.cli import main as cli
from ocrserver.config import ServerConfig
from ocrserver.server import start_server
from ocrserver.truth import make_test_image
from producers.enqueue import enqueue
from producers.ledger import Ledger
from producers.plan import DigestSet, PlanReport, QuotaView, bill, make_plan, plan_items
from producers.sources import open_source
from workers.books.runs import RunStore
from workers.config import Settings
from workers.keys import Keys
from workers.message import Chunk
from workers.ratelimit import from_settings
from workers.runner import Runtime, execute_chunk

BUCKET = "cn-plan-test"


def plate(i: int) -> bytes:
    return make_test_image([{"text": f"沪C{i:05d}", "type": "小型汽车"}])


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    PILImage.frombytes("RGB", (w, h), os.urandom(w * h * 3)).save(buf, format="PNG")
    return buf.getvalue()


BAD = {
    "doc.jpg": b"%PDF-1.4\n" + b"0" * 500,
    "tiny.png": png(10, 10),
    "long.png": png(1040, 20),
    "text.jpg": b"not a picture\n" * 50,
}


def test_digest_set_is_a_set_on_disk(tmp_path: Path) -> None:
    with DigestSet(str(tmp_path)) as seen:
        assert seen.add(b"a") and seen.add(b"b") and not seen.add(b"a")
        assert all(seen.add(f"k{i}".encode()) for i in range(20_000))
        assert not seen.add(b"k19999")


def test_folder_plan_counts_rules_duplicates_and_earlier_answers(tmp_path: Path) -> None:
    folder = tmp_path / "cams"
    folder.mkdir()
    for i in range(6):
        (folder / f"img-{i}.png").write_bytes(plate(i))
    (folder / "img-0-copy.png").write_bytes(plate(0))  # same bytes, other name
    for name, data in BAD.items():
        (folder / name).write_bytes(data)
    settings = Settings(chunk_size=4)
    refs = list(open_source(str(folder), settings))
    answered_id = next(r.image_id for r in refs if r.source.endswith("img-5.png"))

    class OneAnswered:
        def answered(self, ids: Any) -> set[str]:
            return {i for i in ids if i == answered_id}

    seen: list[int] = []
    report = make_plan(
        plan_items(str(folder), settings),
        settings,
        source=str(folder),
        ledger=OneAnswered(),
        on_progress=lambda r: seen.append(r.listed),
    )
    assert report.listed == 11 and seen == [4, 8, 11]
    assert report.answered_earlier == 1
    assert report.rejected_by_rule == {
        "local.unsupportedFormat": 2,
        "local.imageTooSmall": 1,
        "local.aspectRatio": 1,
    }
    assert report.examples["local.imageTooSmall"] == [(folder / "tiny.png").as_uri()]
    assert report.duplicates == 1 and report.duplicates_by_key == {"sha256": 1}
    assert report.calls == 5  # img-0..4; the copy, the answered one and the bad ones are free


def _report(calls: int) -> PlanReport:
    return PlanReport(source="x", calls=calls)


def test_bill_time_windows_cost_and_fit() -> None:
    s = Settings(qps=10, quota=1000, price_per_1000_calls=2.5)
    r = bill(_report(2500), s, QuotaView(limit=1000, window="day", used=400, left=600))
    assert r.calls_per_s == pytest.approx(10 / 1.01)
    assert r.call_time_s == pytest.approx(252.5, abs=0.1)
    assert r.cost == pytest.approx(6.25)
    assert not r.fits and r.quota_windows == 3  # 600 today, then 1000 + 900
    assert r.verdict.startswith("does NOT fit: 2500 calls needed, 600 left")
    r = bill(_report(600), s, QuotaView(limit=1000, window="day", used=400, left=600))
    assert r.fits and r.quota_windows == 1
    # Time can span more days than the quota: 10 QPS for 2 M calls is 2.3 days.
    r = bill(_report(2_000_000), Settings(qps=10), QuotaView(limit=None, window="day"))
    assert r.fits and r.quota_windows == 3 and r.cost is None
    total = Settings(quota=100, quota_window="total")
    r = bill(_report(101), total, QuotaView(limit=100, window="total", used=0, left=100))
    assert not r.fits and r.quota_windows is None and "total quota" in r.verdict
    r = bill(_report(5), Settings(qps=0), None)
    assert r.fits and r.call_time_s is None


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as url:
        client = s3_client(url)
        client.create_bucket(Bucket=BUCKET)
        for i in range(4):
            client.put_object(Bucket=BUCKET, Key=f"day/good-{i}.png", Body=plate(i))
        client.put_object(Bucket=BUCKET, Key="day/moved/good-0.png", Body=plate(0))
        client.put_object(Bucket=BUCKET, Key="day/empty.jpg", Body=b"")
        for name, data in BAD.items():
            client.put_object(Bucket=BUCKET, Key=f"day/{name}", Body=data)
        yield url


def test_s3_url_mode_plan_uses_the_listing_and_ranged_reads(s3_endpoint: str) -> None:
    settings = Settings(s3_endpoint_url=s3_endpoint, s3_mode="url")
    report = make_plan(plan_items(f"s3://{BUCKET}/day/", settings), settings)
    assert report.listed == 10
    assert report.rejected_by_rule == {
        "local.unsupportedFormat": 2,
        "local.aspectRatio": 1,
        "local.emptyImage": 1,
        "local.imageTooSmall": 1,
    }
    assert report.duplicates_by_key == {"etag": 1}  # the moved copy: same ETag and size
    assert report.calls == 4
    assert report.bytes_read < 40_000  # small objects are read whole, the empty one not at all
    quick = make_plan(plan_items(f"s3://{BUCKET}/day/", settings), settings, listing_only=True)
    assert quick.bytes_read == 0 and quick.rejected_by_rule == {"local.emptyImage": 1}
    assert quick.duplicates == 1 and quick.calls == 8


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _real_run(settings: Settings, source: str, run_id: str, redis_url: str) -> tuple[int, int]:
    """Enqueue ``source`` as ``carnumber enqueue`` does (ledger included) and run every chunk
    through the worker path; returns (calls the server saw, rows written)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    runs = RunStore(client, Keys(settings.key_prefix))
    chunks: list[Chunk] = []
    runs.create(run_id, source)
    runs.touch(run_id)
    with Ledger.open(settings.output, exclude_run=run_id) as ledger:
        enqueue(
            open_source(source, settings),
            run_id,
            runs=runs,
            publish=chunks.append,
            queue_depth=lambda: 0,
            chunk_size=settings.chunk_size,
            queue_high_water=100,
            ledger=ledger,
        )
    calls = rows = 0
    with Runtime.from_settings(settings) as rt:
        for chunk in chunks:
            result = execute_chunk(chunk, rt)
            calls += result.calls
        rows = len(rt.dataset.read_run(run_id))
    client.close()
    return calls, rows


def test_plan_call_count_equals_a_real_runs(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    first = {f"cam/{i:03d}.png": plate(i) for i in range(8)}
    second = {**first, **{f"cam/{i:03d}.png": plate(i) for i in range(8, 20)}}
    second.update({f"bad/{k}": v for k, v in BAD.items()})
    _tar(tmp_path / "night1.tar", first)
    _tar(tmp_path / "night2.tar", second)
    with start_server(ServerConfig(keys="planid:plansecret")) as srv:
        env = {
            "CARNUMBER_ENDPOINT": srv.url,
            "ALIBABA_CLOUD_ACCESS_KEY_ID": "planid",
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "plansecret",
            "REDIS_URL": redis_url,
            "CARNUMBER_KEY_PREFIX": key_prefix,
            "CARNUMBER_OUTPUT": str(tmp_path / "out"),
            "CARNUMBER_CHUNK_SIZE": "6",
            "CARNUMBER_QPS": "0",
        }
        settings = Settings.from_env(env)
        # Night 1 answers the first 8 in "paths" the second archive does not share; re-listing
        # the same members under night2.tar are new image ids: all of night 2 is planned.
        calls1, _ = _real_run(settings, str(tmp_path / "night1.tar"), "n1", redis_url)
        assert calls1 == 8
        with Ledger.open(settings.output, exclude_run="n1-again") as ledger:
            again = make_plan(plan_items(str(tmp_path / "night1.tar"), settings), settings, ledger=ledger)
        assert again.answered_earlier == 8 and again.calls == 0
        with Ledger.open(settings.output, exclude_run="n2") as ledger:
            planned = make_plan(plan_items(str(tmp_path / "night2.tar"), settings), settings, ledger=ledger)
        before = httpx.get(f"{srv.url}/__carnumber/stats").json()["requests_total"]
        calls2, rows2 = _real_run(settings, str(tmp_path / "night2.tar"), "n2", redis_url)
        seen = httpx.get(f"{srv.url}/__carnumber/stats").json()["requests_total"] - before
    assert planned.listed == 24 and planned.rejected == 4 and planned.duplicates == 0
    assert planned.calls == calls2 == seen == 20
    assert rows2 >= 24


def test_cli_json_and_exit_status_follow_the_quota(
    tmp_path: Path, redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    folder = tmp_path / "cams"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.png").write_bytes(plate(i))
    env = {
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "plan-cli-key",
        "CARNUMBER_ACCOUNT": f"acct-{key_prefix}",
        "REDIS_URL": redis_url,
        "CARNUMBER_KEY_PREFIX": key_prefix,
        "CARNUMBER_OUTPUT": str(tmp_path / "out"),
        "CARNUMBER_QUOTA": "6",
        "CARNUMBER_PRICE_PER_1000_CALLS": "4",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cli(["plan", str(folder), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["calls"] == 5 and doc["fits"] and doc["quota"]["left"] == 6
    assert doc["cost"] == pytest.approx(0.02)

    async def spend(n: int) -> None:  # another team of the same account used some quota
        ar = aredis.Redis.from_url(redis_url)
        other_team = {**env, "ALIBABA_CLOUD_ACCESS_KEY_ID": "plan-cli-other-ram-user"}
        _, quota = from_settings(Settings.from_env(other_team), ar)
        for _ in range(n):
            await quota.reserve()
        await ar.aclose()

    asyncio.run(spend(2))
    assert cli(["plan", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit: 5 calls needed, 4 left" in out.splitlines()[-1]


def test_progress_prints_plain_lines_without_a_terminal_and_render_names_every_figure() -> None:
    from carnumber.commands.plan import _Progress, render

    buf = io.StringIO()
    progress = _Progress(buf, every_s=0.0)
    report = PlanReport(source="s3://b/p", listed=400, calls=390, rejected=10, scan_s=2.0)
    progress(report)
    progress(report)
    progress.done()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and "400 listed" in lines[0] and "200 images/s" in lines[0]
    report.rejected_by_rule = {"local.aspectRatio": 10}
    report.examples = {"local.aspectRatio": ["s3://b/p/x.png"]}
    text = render(bill(report, Settings(quota=100, price_per_1000_calls=2), QuotaView(100, "day", 0, 100)))
    for needle in ("images listed", "local.aspectRatio", "s3://b/p/x.png", "calls needed", "390"):
        assert needle in text
    assert text.splitlines()[-1].startswith("does NOT fit: 390 calls needed, 100 left")
