"""A chunk through the real pipeline: real local server on loopback, real Redis, real Parquet.

Runs ``execute_chunk`` directly (the Celery task is a thin wrapper, exercised in
``test_celery_flow.py``), so each behaviour here is quick and exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ocrserver.config import ServerConfig
from ocrserver.server import RunningServer, start_server
from ocrserver.truth import make_test_image
from workers.config import Settings
from workers.message import Chunk, ImageRef
from workers.runner import Runtime, execute_chunk

KEYS = "testid:testsecret"


_opened: list[Runtime] = []


@pytest.fixture(autouse=True)
def _close_runtimes() -> Iterator[None]:
    yield
    while _opened:
        _opened.pop().close()


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with start_server(ServerConfig(keys=KEYS)) as srv:
        yield srv


def _stats(server: RunningServer) -> dict:
    return httpx.get(f"{server.url}/__carnumber/stats").json()


def _images(folder: Path, n: int, plates_every: int = 1) -> list[ImageRef]:
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for i in range(n):
        text = f"京A{i:05d}"
        plates = [{"text": text, "type": "小型汽车"}] if i % plates_every == 0 else []
        path = folder / f"img {i:03d}.png"
        path.write_bytes(make_test_image(plates))
        refs.append(ImageRef(path.as_uri(), meta={"camera": f"cam{i % 2}"}))
    return refs


def _runtime(server: RunningServer, redis_url: str, key_prefix: str, tmp: Path, **env: str) -> Runtime:
    settings = Settings.from_env(
        {
            "CARNUMBER_ENDPOINT": server.url,
            "ALIBABA_CLOUD_ACCESS_KEY_ID": "testid",
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "testsecret",
            "REDIS_URL": redis_url,
            "CARNUMBER_KEY_PREFIX": key_prefix,
            "CARNUMBER_OUTPUT": str(tmp / "out"),
            "CARNUMBER_QPS": "0",
            "CARNUMBER_RETRY_BASE_S": "0.01",
            "CARNUMBER_RETRY_CAP_S": "0.05",
            **env,
        }
    )
    rt = Runtime.from_settings(settings)
    _opened.append(rt)
    return rt


def test_chunk_writes_one_row_per_plate_and_failures(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    refs = _images(tmp_path / "a", 12, plates_every=3)
    pdf = tmp_path / "a" / "fake.jpg"
    pdf.write_bytes(b"%PDF-1.4\n" + b"0" * 400)
    refs.append(ImageRef(pdf.as_uri()))
    rt = _runtime(server, redis_url, key_prefix, tmp_path)
    rt.runs.create("r1", "test")
    rt.runs.touch("r1")
    chunk = Chunk("r1", "0000000", tuple(refs))
    result = execute_chunk(chunk, rt)
    assert (result.answered, result.failed, result.plates, result.pending) == (12, 1, 4, [])
    # The PDF was refused locally, no call spent; the 8 pictures without a plate are byte for byte
    # the same picture: one call answers all of them, each with its own row.
    assert result.calls == 5 and result.journalled == 7
    rows = rt.dataset.read_run("r1").to_pylist()
    ok = sorted(r["plate"] for r in rows if r["status"] == "ok")
    assert ok == ["京A00000", "京A00003", "京A00006", "京A00009"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed[0]["error_code"].startswith("local.") and failed[0]["attempts"] == 0
    assert {r["meta"][0][1] for r in rows if r["meta"]} == {"cam0", "cam1"}

    # Redelivery of the same message: its part is already written and counted, so nothing is
    # called or written again.
    again = execute_chunk(chunk, rt)
    assert again.calls == 0 and again.rows == []
    assert len(rt.dataset.read_run("r1")) == len(rows)
    summary = rt.runs.get("r1")
    assert summary is not None and summary.written == 13
    # Every call was counted for the metrics exporter, with its latency; the redelivery made none.
    from workers.keys import Keys, account_tag
    from workers.metrics import read_call_stats

    stats = read_call_stats(rt.redis, Keys(key_prefix), account_tag("testid"))
    assert stats.by_code == {"ok": 5} and stats.latency_count == 5


def test_retryable_faults_are_retried_and_counted(redis_url: str, key_prefix: str, tmp_path: Path) -> None:
    from ocrserver.faults import FaultConfig

    # Resets, not malformed bodies: an unreadable answer is retried once only
    # (tests/test_unreadable_answer.py).
    faults = FaultConfig(rate_503=0.4, rate_reset=0.1)
    with start_server(ServerConfig(keys=KEYS, faults=faults, seed=3)) as srv:
        refs = _images(tmp_path / "b", 30)
        rt = _runtime(srv, redis_url, key_prefix, tmp_path, CARNUMBER_MAX_ATTEMPTS="8")
        result = execute_chunk(Chunk("r2", "0000000", tuple(refs)), rt)
        stats = _stats(srv)
    assert result.answered == 30 and result.failed == 0
    rows = rt.dataset.read_run("r2").to_pylist()
    assert sum(r["attempts"] for r in rows) == result.calls == stats["requests_total"]
    assert max(r["attempts"] for r in rows) > 1


def test_wrong_secret_stops_the_fleet_and_leaves_images_pending(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    refs = _images(tmp_path / "c", 20)
    rt = _runtime(
        server, redis_url, key_prefix, tmp_path,
        ALIBABA_CLOUD_ACCESS_KEY_SECRET="wrong", CARNUMBER_CONCURRENCY="4",
    )
    rt.runs.create("r3", "test")
    result = execute_chunk(Chunk("r3", "0000000", tuple(refs)), rt)
    assert result.failed == 0 and result.answered == 0
    assert len(result.pending) == 20
    assert result.calls <= 4 + 1  # at most the calls in flight when the first error came back
    summary = rt.runs.get("r3")
    assert summary is not None
    assert summary.state == "stopped" and summary.fields["stop_code"] == "SignatureDoesNotMatch"
    assert summary.parked == 20
    assert len(rt.dataset.read_run("r3")) == 0  # nothing marked failed


def test_no_secret_or_signature_reaches_logs(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    refs = _images(tmp_path / "d", 4)
    url_ref = ImageRef(f"{server.url}/img.png?Signature=abc123secret&Expires=9")
    rt = _runtime(server, redis_url, key_prefix, tmp_path)
    with caplog.at_level(logging.DEBUG):
        execute_chunk(Chunk("r4", "0000000", (*refs, url_ref)), rt)
    text = caplog.text
    assert "testsecret" not in text and "abc123secret" not in text and "Signature=" not in text
    rows = rt.dataset.read_run("r4").to_pylist()
    assert all("abc123secret" not in (r["source"] + str(r["error_message"])) for r in rows)


def test_storage_misconfiguration_stops_instead_of_failing_images(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    rt = _runtime(server, redis_url, key_prefix, tmp_path)  # no OSS endpoint configured
    rt.runs.create("r5", "test")
    refs = (ImageRef("oss://cams/2026/a.jpg"), ImageRef("oss://cams/2026/b.jpg"))
    result = execute_chunk(Chunk("r5", "0000000", refs), rt)
    assert len(result.pending) == 2 and result.calls == 0 and not result.rows
    summary = rt.runs.get("r5")
    assert summary is not None and summary.state == "stopped"
    assert summary.fields["stop_code"] == "local.config"
