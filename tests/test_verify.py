"""``carnumber verify`` against real runs: the real producer (with its enqueued records), the real
worker code path (``execute_chunk`` against the local server on loopback), real Redis and real
Parquet; then parts deleted, copied, compacted, parked, retried, and the CLI's table and JSON.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from carnumber.cli import main as cli
from ocrserver.config import ServerConfig
from ocrserver.faults import FaultConfig
from ocrserver.server import RunningServer, start_server
from ocrserver.truth import make_test_image
from producers.enqueue import enqueue
from producers.verify import Verification, republish_missing, verify_run
from workers.config import Settings
from workers.message import Chunk, ImageRef
from workers.runner import Runtime, execute_chunk
from workers.sink.compact import compact_run
from workers.sink.enqueued import recorder
from workers.sink.failures import retryable_failures
from workers.sink.rows import recognition_rows

pytestmark = pytest.mark.timeout(120)

KEY_ID, SECRET = "verifyid", "verify-secret-0123456789"
RUN = "2026-11-30"

_opened: list[Runtime] = []


@pytest.fixture(autouse=True)
def _close_runtimes() -> Iterator[None]:
    yield
    while _opened:
        _opened.pop().close()


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with start_server(ServerConfig(keys=f"{KEY_ID}:{SECRET}")) as srv:
        yield srv


def _env(server: RunningServer, redis_url: str, key_prefix: str, tmp: Path, **extra: str) -> dict[str, str]:
    return {
        "CARNUMBER_ENDPOINT": server.url or "",
        "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET,
        "REDIS_URL": redis_url,
        "CARNUMBER_KEY_PREFIX": key_prefix,
        "CARNUMBER_OUTPUT": str(tmp / "out"),
        "CARNUMBER_QPS": "0",
        "CARNUMBER_RETRY_BASE_S": "0.01",
        "CARNUMBER_RETRY_CAP_S": "0.05",
        **extra,
    }


def _runtime(env: dict[str, str]) -> Runtime:
    rt = Runtime.from_settings(Settings.from_env(env))
    _opened.append(rt)
    return rt


def _archive(folder: Path, n: int) -> list[ImageRef]:
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for i in range(n):
        plates = [{"text": f"沪B{i:05d}", "type": "小型汽车"}] if i % 3 else []
        path = folder / f"cam-{i:03d}.png"
        path.write_bytes(make_test_image(plates))
        refs.append(ImageRef(path.as_uri()))
    return refs


def _enqueue(rt: Runtime, refs: list[ImageRef], run_id: str = RUN, chunk_size: int = 4) -> list[Chunk]:
    """The producer as ``carnumber enqueue`` wires it (records included); returns the chunks."""
    published: list[Chunk] = []
    rt.runs.create(run_id, "test")
    enqueue(
        refs,
        run_id,
        runs=rt.runs,
        publish=published.append,
        queue_depth=lambda: 0,
        chunk_size=chunk_size,
        queue_high_water=100,
        record=recorder(rt.settings.output),
    )
    rt.runs.touch(run_id)
    return published


def _process(rt: Runtime, chunks: list[Chunk]) -> None:
    for chunk in chunks:
        execute_chunk(chunk, rt)


def _verify(rt: Runtime, run_id: str = RUN, live: list[Chunk] | None = None) -> Verification:
    return verify_run(rt.dataset, rt.runs, run_id, live=live or [], examples=10)


def _parts(rt: Runtime, run_id: str = RUN) -> list[Path]:
    return [Path(p) for p in rt.dataset.parquet_files(rt.dataset.run_dir(run_id))]


def _cli(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return cli(["verify", *argv])


@pytest.fixture
def done_run(server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path) -> tuple[Runtime, dict]:
    """A finished run of 12 images in 3 chunks of 4, one part file each."""
    env = _env(server, redis_url, key_prefix, tmp_path)
    rt = _runtime(env)
    _process(rt, _enqueue(rt, _archive(tmp_path / "a", 12)))
    return rt, env


def test_clean_run_passes(
    done_run: tuple[Runtime, dict], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rt, env = done_run
    v = _verify(rt)
    assert v.ok and v.reasons() == []
    assert (v.enqueued, v.exactly_one, v.answered, v.failed, v.record_chunks) == (12, 12, 12, 0, 3)
    assert (v.missing, v.parked, v.duplicated, v.unexpected, v.superseded) == (0, 0, 0, 0, 0)
    assert v.compaction == "none" and v.part_files == 3 and v.state == "done"
    assert _cli(env, monkeypatch, RUN) == 0
    out = capsys.readouterr().out
    assert f"verify run {RUN}: OK, each of 12 enqueued images has exactly one outcome" in out
    assert "exactly one outcome" in out and "not compacted (3 part files" in out


def _ids_in(path: Path) -> set[str]:
    import pyarrow.parquet as pq

    return set(pq.read_table(path, columns=["image_id"])["image_id"].to_pylist())


def test_deleted_part_reports_its_images_missing(
    done_run: tuple[Runtime, dict],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    rt, env = done_run
    victim = next(p for p in _parts(rt) if p.name.startswith("part-0000001-"))
    lost = _ids_in(victim)
    victim.unlink()
    v = _verify(rt)
    assert not v.ok and v.reasons() == ["4 missing"]
    assert (v.missing, v.exactly_one, v.duplicated) == (4, 8, 0)
    assert {e.image_id for e in v.examples["missing"]} == lost
    assert all(e.detail == "chunk 0000001" and e.source.startswith("file://") for e in v.examples["missing"])

    listing = tmp_path / "missing.csv"
    assert _cli(env, monkeypatch, RUN, "--missing", str(listing)) == 1
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"verify run {RUN}: MISMATCH: 4 missing")
    assert all(i in out for i in lost)
    with listing.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["image_id"] for r in rows} == lost and {r["kind"] for r in rows} == {"missing"}
    assert all(r["url"].startswith("file://") and r["chunk_id"] == "0000001" for r in rows)

    # `--republish` puts the missing images back on the broker under their own chunk id and
    # positions; the run's books forget them first (their rows are gone), so the run is not done.
    queue = f"{env['CARNUMBER_KEY_PREFIX']}:queue"
    assert _cli({**env, "CARNUMBER_QUEUE": queue}, monkeypatch, RUN, "--republish") == 1
    assert "re-published 4 missing images in 1 chunks (their own chunk ids)" in capsys.readouterr().out
    assert rt.runs.r.llen(queue) == 1
    assert rt.runs.get(RUN).state == "running"  # type: ignore[union-attr]
    # Published again (an operator runs it twice): the books count each image once.
    published: list[Chunk] = []
    assert len(republish_missing(v, rt.dataset, rt.runs, published.append, rt.outcomes)) == 1
    assert [(c.chunk_id, c.position_of()) for c in published] == [("0000001", (0, 1, 2, 3))]
    assert {r.image_id for c in published for r in c.images} == lost
    _process(rt, published + published)
    v = _verify(rt)
    assert v.ok, v.reasons()
    assert rt.runs.get(RUN).state == "done"  # type: ignore[union-attr]


def test_duplicated_part_is_reported_until_compaction(
    done_run: tuple[Runtime, dict], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rt, env = done_run
    original = next(p for p in _parts(rt) if p.name.startswith("part-0000002-"))
    copy = original.with_name("part-0000002-copied.parquet")
    shutil.copyfile(original, copy)
    twice = _ids_in(original)
    v = _verify(rt)
    assert not v.ok and v.reasons() == ["4 duplicated"]
    assert (v.duplicated, v.exactly_one, v.missing, v.superseded) == (4, 8, 0, 0)
    assert {e.image_id for e in v.examples["duplicated"]} == twice
    assert all(original.name in e.detail and copy.name in e.detail for e in v.examples["duplicated"])
    assert _cli(env, monkeypatch, RUN) == 1
    assert capsys.readouterr().out.rstrip().endswith("MISMATCH: 4 duplicated")

    compact_run(rt.dataset, RUN, rows_per_file=5)  # small files: an image's rows may straddle two
    v = _verify(rt)
    assert v.ok and v.compaction == "compacted" and v.compacted_files > 1 and v.part_files == 0
    assert v.exactly_one == 12

    # After compaction, any second copy of an outcome is a duplicate, whatever its name.
    first = _parts(rt)[0]
    shutil.copyfile(first, first.with_name("compacted-zzzzzzzz-00000.parquet"))
    v = _verify(rt)
    assert not v.ok and v.duplicated == len(_ids_in(first)) and v.compaction == "compacted"


def test_failures_superseded_by_a_retry_round_are_not_duplicates(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    refs = _archive(tmp_path / "a", 6)
    with start_server(ServerConfig(keys=f"{KEY_ID}:{SECRET}", faults=FaultConfig(rate_503=1.0))) as bad:
        rt = _runtime(_env(bad, redis_url, key_prefix, tmp_path, CARNUMBER_MAX_ATTEMPTS="1"))
        _process(rt, _enqueue(rt, refs, chunk_size=3))
        v = _verify(rt)
    # A terminal failure is an image's one outcome: reported by code, not a mismatch.
    assert v.ok and (v.exactly_one, v.failed, v.answered) == (6, 6, 0)
    assert [(f.retryable, f.images) for f in v.failed_by_code] == [(True, 6)]

    # One retry-failures round, as the command publishes it: retry1- chunks, no new records.
    retry = retryable_failures(rt.dataset, RUN)
    published: list[Chunk] = []
    enqueue(
        retry,
        RUN,
        runs=rt.runs,
        publish=published.append,
        queue_depth=lambda: 0,
        chunk_size=3,
        queue_high_water=100,
        chunk_prefix="retry1-",
    )
    with start_server(ServerConfig(keys=f"{KEY_ID}:{SECRET}")) as good:
        rt2 = _runtime(_env(good, redis_url, key_prefix, tmp_path))
        _process(rt2, published)
    v = _verify(rt2)
    assert v.ok, v.reasons()
    assert (v.exactly_one, v.answered, v.failed, v.superseded, v.duplicated) == (6, 6, 0, 6, 0)
    assert v.record_chunks == 2 and v.unrecorded_chunks == 0  # retry chunks need no record
    compact_run(rt2.dataset, RUN)
    v = _verify(rt2)
    assert v.ok and v.superseded == 0 and v.compaction == "compacted"


def test_parked_images_are_reported_with_the_reason(
    server: RunningServer,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = _env(server, redis_url, key_prefix, tmp_path, ALIBABA_CLOUD_ACCESS_KEY_SECRET="wrong")
    rt = _runtime(env)
    chunks = _enqueue(rt, _archive(tmp_path / "a", 8))
    _process(rt, chunks)  # the first chunk stops the fleet; every image is parked, none failed
    v = _verify(rt)
    assert not v.ok and v.parked == 8 and v.missing == 0 and v.exactly_one == 0
    assert v.state == "stopped" and v.stop_code == "SignatureDoesNotMatch"
    assert v.parked_chunks == 2 and rt.runs.r.hlen(rt.runs.keys.run_parked(RUN)) == 2
    assert {e.detail for e in v.examples["parked"]} == {"parked chunk 0000000", "parked chunk 0000001"}
    assert _cli(env, monkeypatch, RUN, "--json") == 1
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["parked"] == 8 and data["parked_chunks"] == 2 and data["stop_code"] == "SignatureDoesNotMatch"
    assert captured.err.strip() == f"verify run {RUN}: MISMATCH: 8 parked"


def test_json_shape_unexpected_and_a_run_still_running(
    done_run: tuple[Runtime, dict], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rt, env = done_run
    stray = ImageRef("file:///elsewhere/not-enqueued.jpg")
    from workers.api.response import Recognition

    rec = Recognition(plates=(), width=1, height=1, org_width=1, org_height=1, request_id="r")
    rt.dataset.write_part(RUN, "part-9999999-stray", recognition_rows(RUN, stray, rec, attempts=1))
    assert _cli(env, monkeypatch, RUN, "--json") == 1
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= {
        "run_id", "ok", "reasons", "state", "compacted", "files", "enqueued", "exactly_one", "missing",
        "parked", "duplicated", "unexpected", "failed_by_code", "superseded", "examples",
    }  # fmt: skip
    assert data["ok"] is False and data["reasons"] == ["1 unexpected"] and data["compacted"] is False
    assert (data["enqueued"], data["exactly_one"], data["unexpected"]) == (12, 12, 1)
    [example] = data["examples"]["unexpected"]
    assert example == {
        "image_id": stray.image_id,
        "source": stray.source,
        "detail": "in part-9999999-stray.parquet",
    }

    # A run whose chunks are still queued: in flight, not missing (never republished).
    queued = _enqueue(rt, _archive(Path(env["CARNUMBER_OUTPUT"]).parent / "b", 5), run_id="r-busy")
    assert len(queued) == 2
    v = _verify(rt, "r-busy", live=queued)
    assert (v.missing, v.in_flight_images) == (0, 5) and v.reasons() == ["5 in_flight"]
    assert republish_missing(v, rt.dataset, rt.runs, queued.append, rt.outcomes) == []
    v = _verify(rt, "r-busy", live=queued[:1])  # the second chunk's message was lost
    assert (v.missing, v.in_flight_images) == (1, 4) and v.reasons() == ["1 missing", "4 in_flight"]


def test_bad_input_exits_2(
    server: RunningServer,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = _env(server, redis_url, key_prefix, tmp_path)
    assert _cli(env, monkeypatch, "no-such-run") == 2
    err = capsys.readouterr().err
    assert "run 'no-such-run': not found in Redis" in err and key_prefix in err

    # A run enqueued by a producer that kept no records (an older carnumber).
    rt = _runtime(env)
    rt.runs.create("old", "test")
    enqueue(
        _archive(tmp_path / "a", 3),
        "old",
        runs=rt.runs,
        publish=lambda c: None,
        queue_depth=lambda: 0,
        chunk_size=2,
        queue_high_water=10,
    )
    assert _cli(env, monkeypatch, "old") == 2
    err = capsys.readouterr().err
    assert "no record" in err and "older" in err and "CARNUMBER_OUTPUT" in err

    # A record that is not Parquet (a truncated copy): a clear error, no traceback.
    _enqueue(rt, _archive(tmp_path / "b", 2), run_id="torn")
    (Path(env["CARNUMBER_OUTPUT"]) / "_enqueued" / "run=torn" / "chunk-0000000.parquet").write_bytes(b"PAR1")
    assert _cli(env, monkeypatch, "torn") == 2
    assert "cannot read its records or output" in capsys.readouterr().err


def test_records_and_verify_on_an_s3_output(redis_client: redis.Redis, key_prefix: str) -> None:
    """The same records and checks through pyarrow's S3 filesystem (moto's server on loopback)."""
    from helpers.s3_server import moto_s3, s3_client

    from workers.api.response import Recognition
    from workers.books.runs import RunStore
    from workers.keys import Keys
    from workers.sink.dataset import open_dataset

    refs = [ImageRef(f"s3://cams/2026-11-30/{i:03d}.jpg?X-Amz-Signature=abc") for i in range(5)]
    runs = RunStore(redis_client, Keys(key_prefix))
    with moto_s3() as endpoint:
        s3_client(endpoint).create_bucket(Bucket="verify-out")
        host = endpoint.removeprefix("http://")
        output = f"s3://verify-out/plates?endpoint_override={host}&scheme=http&region=us-east-1"
        published: list[Chunk] = []
        runs.create(RUN, "s3")
        record = recorder(output)
        kwargs = dict(runs=runs, queue_depth=lambda: 0, chunk_size=2, queue_high_water=9, record=record)
        enqueue(refs, RUN, publish=published.append, **kwargs)  # type: ignore[arg-type]
        dataset = open_dataset(output)
        rec = Recognition("req", ())
        for chunk in published:
            rows = [row for ref in chunk.images for row in recognition_rows(RUN, ref, rec, attempts=1)]
            dataset.write_part(RUN, chunk.part_name, rows)
        v = verify_run(dataset, runs, RUN)
        assert v.ok and (v.enqueued, v.record_chunks, v.part_files) == (5, 3, 3)
        dataset.fs.delete_file(dataset.parquet_files(dataset.run_dir(RUN))[0])
        v = verify_run(dataset, runs, RUN)
        assert v.missing == 2 and not v.ok
        assert all("Signature" not in e.source for e in v.examples["missing"])  # type: ignore[operator]
