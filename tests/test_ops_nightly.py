"""ops/nightly.sh for real: bash and shellcheck accept it, and it drives the real ``carnumber``
commands against real Redis, a real Celery worker and the local API server on loopback.

* a quota spent mid-run: exit 3; the next night resumes that run (never lifting a stop) and
  processes its own;
* retryable failures (injected 503s, one attempt each): one retry round, then compaction;
* every finished run is verified after compaction; a part lost before verify: exit 6;
* a stopped fleet: exit 4 and nothing enqueued; a held lock: exit 75; no SOURCE: exit 2.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aredis

from carnumber.localstack import Child, start_worker
from ocrserver.config import ServerConfig
from ocrserver.faults import FaultConfig
from ocrserver.server import RunningServer, start_server
from ocrserver.truth import make_test_image
from workers.books.runs import RunStore
from workers.fleet import FleetControl
from workers.keys import Keys, account_tag
from workers.sink.dataset import open_dataset

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]
NIGHTLY = ROOT / "ops" / "nightly.sh"
KEY_ID, SECRET = "nightlyid", "nightly-secret-value-0123"


def test_nightly_script_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", str(NIGHTLY)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert os.access(NIGHTLY, os.X_OK)
    text = NIGHTLY.read_text()
    assert "set -euo pipefail" in text and "set -x" not in text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt shellcheck)")
def test_nightly_script_passes_shellcheck() -> None:
    done = subprocess.run(["shellcheck", str(NIGHTLY)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _archive(folder: Path, n: int, first: int = 0) -> Path:
    folder.mkdir(parents=True)
    for i in range(first, first + n):
        plates = [{"text": f"浙A{i:05d}", "type": "小型汽车"}]
        (folder / f"cam2-{i:03d}.png").write_bytes(make_test_image(plates))
    return folder


def _env(
    redis_url: str, key_prefix: str, tmp: Path, server: RunningServer | None = None, **extra: str
) -> dict[str, str]:
    return {
        "CARNUMBER_ENDPOINT": server.url if server else "http://127.0.0.1:9",
        "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET,
        "REDIS_URL": redis_url,
        "CARNUMBER_KEY_PREFIX": key_prefix,
        "CARNUMBER_QUEUE": f"{key_prefix}:queue",
        "CARNUMBER_OUTPUT": str(tmp / "out"),
        "CARNUMBER_CHUNK_SIZE": "4",
        "CARNUMBER_QPS": "0",
        **extra,
    }


def _nightly(env: dict[str, str], tmp: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CARNUMBER_", "ALIBABA_CLOUD_", "OSS_"))},
        **env,
        "CARNUMBER": f"{sys.executable} -m carnumber.cli",
        "LOCK_FILE": str(tmp / "nightly.lock"),
        "FOLLOW_TIMEOUT": "120",
        "FOLLOW_LOG_EVERY": "1",
        **extra,
    }
    done = subprocess.run(
        ["bash", str(NIGHTLY)], cwd=ROOT, env=full, capture_output=True, text=True, timeout=200
    )
    assert SECRET not in done.stdout + done.stderr  # logs without secrets
    return done


def _worker(env: dict[str, str]) -> Child:
    return start_worker(env, concurrency=1, hostname=f"n{abs(hash(env['CARNUMBER_KEY_PREFIX']))}@%h")


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with start_server(ServerConfig(keys=f"{KEY_ID}:{SECRET}")) as srv:
        yield srv


def test_quota_parks_the_run_and_the_next_night_resumes_it(
    server: RunningServer, redis_url: str, key_prefix: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    runs = RunStore(redis_client, Keys(key_prefix))
    # A queue of one chunk at most: the producer is still feeding when the quota runs out, and
    # stops there, so the next night must publish the rest of the source as well as the parked.
    night1 = _env(
        redis_url,
        key_prefix,
        tmp_path,
        server,
        CARNUMBER_QUOTA="5",
        CARNUMBER_QUOTA_WINDOW="total",
        CARNUMBER_QUEUE_HIGH_WATER="1",
    )
    archive = _archive(tmp_path / "a" / "2026-11-22", 24)
    worker = _worker(night1)
    try:
        first = _nightly(
            night1, tmp_path, SOURCE=str(archive).replace("2026-11-22", "{date}"), RUN_DATE="2026-11-22"
        )
    finally:
        worker.stop()
    assert first.returncode == 3, first.stdout + first.stderr
    assert "call quota spent" in first.stdout
    s1 = runs.get("2026-11-22")
    assert s1 is not None and s1.state == "quota_exhausted" and s1.written == 5
    assert s1.enqueued < 24  # the producer stopped feeding the paused run

    # The quota is raised (a new day); the next night resumes the parked run and does its own.
    night2 = {**night1, "CARNUMBER_QUOTA": "100"}
    worker = _worker(night2)
    try:
        second = _nightly(
            night2, tmp_path, SOURCE=str(_archive(tmp_path / "b", 3, first=100)), RUN_ID="night-2"
        )
    finally:
        worker.stop()
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming run 2026-11-22 (state quota_exhausted)" in second.stdout
    # resume finished the enqueue that stopped early, with the command recorded for it
    finishing = f"finishing the enqueue of {archive}: carnumber enqueue {archive} --run 2026-11-22"
    assert finishing in second.stdout
    assert "compacting run night-2" in second.stdout and "retrying" not in second.stdout
    assert "compacting run 2026-11-22" in second.stdout  # the resumed run is finished too
    assert "verify run night-2: OK, each of 3 enqueued images has exactly one outcome" in second.stdout
    assert "verify run 2026-11-22: OK, each of 24 enqueued images" in second.stdout
    assert "carnumber report night-2 (done" in second.stdout  # the morning summary, in the log
    assert runs.get("2026-11-22").state == "done"  # type: ignore[union-attr]
    dataset = open_dataset(night2["CARNUMBER_OUTPUT"])
    rows2 = dataset.read_run("night-2").to_pylist()
    assert sorted(r["plate"] for r in rows2) == [f"浙A{i:05d}" for i in range(100, 103)]
    rows1 = dataset.read_run("2026-11-22").to_pylist()
    assert sorted({r["plate"] for r in rows1}) == [f"浙A{i:05d}" for i in range(24)]


def test_retryable_failures_get_one_retry_round(
    redis_url: str, key_prefix: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    faults = FaultConfig(rate_503=0.4)
    with start_server(ServerConfig(keys=f"{KEY_ID}:{SECRET}", faults=faults, seed=3)) as srv:
        env = _env(redis_url, key_prefix, tmp_path, srv, CARNUMBER_MAX_ATTEMPTS="1")
        worker = _worker(env)
        try:
            done = _nightly(env, tmp_path, SOURCE=str(_archive(tmp_path / "a", 12)), RUN_ID="r-retry")
        finally:
            worker.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "images of run r-retry with a retryable failure (one round)" in done.stdout
    assert "compacting run r-retry after the retry round" in done.stdout
    verified = done.stdout[done.stdout.index("verifying run r-retry") :]
    assert "verify run r-retry: OK, each of 12 enqueued images has exactly one outcome" in verified
    rows = open_dataset(env["CARNUMBER_OUTPUT"]).read_run("r-retry").to_pylist()
    assert len({r["image_id"] for r in rows}) == 12 == len(rows)  # compacted: one outcome per image
    summary = RunStore(redis_client, Keys(key_prefix)).get("r-retry")
    assert summary is not None and int(summary.fields["retry_rounds"]) == 1


def test_a_mismatch_found_by_verify_fails_the_night(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    # Between compaction and verify, the run's (only) compacted file disappears, as if storage lost it.
    wrapper = tmp_path / "carnumber.sh"
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$1" == verify ]]; then rm "$CARNUMBER_OUTPUT/run=$2"/compacted-*.parquet; fi\n'
        f'exec {sys.executable} -m carnumber.cli "$@"\n'
    )
    env = _env(redis_url, key_prefix, tmp_path, server)
    worker = _worker(env)
    try:
        done = _nightly(
            env,
            tmp_path,
            SOURCE=str(_archive(tmp_path / "a", 6)),
            RUN_ID="r-lost",
            CARNUMBER=f"bash {wrapper}",
        )
    finally:
        worker.stop()
    assert done.returncode == 6, done.stdout + done.stderr
    assert "verify run r-lost: MISMATCH: 6 missing" in done.stdout
    assert "run r-lost: the output does not match what was enqueued" in done.stdout


def test_stopped_fleet_enqueues_nothing(
    redis_url: str, key_prefix: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    async def stop() -> None:
        ar = aredis.Redis.from_url(redis_url)
        try:
            await FleetControl(ar, Keys(key_prefix), account_tag(KEY_ID)).stop(
                "InvalidAccessKeyId.NotFound", "", "x"
            )
        finally:
            await ar.aclose()

    asyncio.run(stop())
    env = _env(redis_url, key_prefix, tmp_path)
    done = _nightly(env, tmp_path, SOURCE=str(_archive(tmp_path / "a", 2)), RUN_ID="r-stop")
    assert done.returncode == 4, done.stdout + done.stderr
    assert "fleet stopped by InvalidAccessKeyId.NotFound" in done.stdout
    assert RunStore(redis_client, Keys(key_prefix)).runs() == []


def test_lock_and_missing_source(redis_url: str, key_prefix: str, tmp_path: Path) -> None:
    env = _env(redis_url, key_prefix, tmp_path)
    missing = _nightly(env, tmp_path)
    assert missing.returncode == 2 and "SOURCE is not set" in missing.stdout
    with open(tmp_path / "nightly.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked = _nightly(env, tmp_path, SOURCE=str(tmp_path))
    assert locked.returncode == 75 and "holds" in locked.stdout
