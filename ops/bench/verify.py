"""How long ``carnumber verify`` takes, and its peak memory, on a run of many images.

Builds a synthetic finished run of ``--images`` images in chunks of 200 the way the real code
writes them (the producer's records through :class:`workers.sink.enqueued.EnqueuedRecords`, one part
per chunk through ``Dataset.write_part`` with rows from ``workers.sink.rows``, the run's Redis
bookkeeping through :class:`workers.books.runs.RunStore`; every 10th image has no plate, every 50th
failed), then times ``carnumber verify RUN --json`` in a fresh process for three states:

* ``parts``: the run as the workers left it (one part per chunk);
* ``damaged``: one part deleted and another copied under a second name (must exit 1);
* ``compacted``: after ``carnumber compact`` (must exit 0).

Peak RSS is the child's own ``ru_maxrss`` (``os.wait4``). Uses ``REDIS_URL`` when set, else an embedded Redis;
its keys live under a private prefix, deleted afterwards.

Usage::

    python ops/bench/verify.py                  # 100,000 images
    python ops/bench/verify.py --images 20000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from carnumber.embedded_redis import EmbeddedRedis  # noqa: E402

CHUNK = 200


def build(output: str, redis_url: str, prefix: str, run_id: str, images: int) -> None:
    """Write the records, parts and Redis bookkeeping of a finished run of ``images`` images."""
    import redis

    from workers.api.response import Plate, Recognition
    from workers.books.outcomes import Outcome, OutcomeBook
    from workers.books.runs import RunStore
    from workers.keys import Keys
    from workers.message import Chunk, ImageRef
    from workers.sink.dataset import open_dataset
    from workers.sink.enqueued import EnqueuedRecords
    from workers.sink.rows import Failure, failure_rows, recognition_rows

    dataset = open_dataset(output)
    records = EnqueuedRecords(dataset)
    client = redis.Redis.from_url(redis_url)
    runs = RunStore(client, Keys(prefix))
    books = OutcomeBook(client, Keys(prefix))
    runs.create(run_id, "bench")
    now = datetime.now(UTC)
    plate = Plate(text="浙A12345", plate_type="小型汽车", prob=0.99, type_prob=0.98, polygon=((1, 2),) * 4)
    for k in range(0, images, CHUNK):
        refs = tuple(
            ImageRef(f"oss://cams/2026-11-30/cam{i % 40:02d}/{i:08d}.jpg", meta={"camera": str(i % 40)})
            for i in range(k, min(k + CHUNK, images))
        )
        chunk = Chunk(run_id, f"{k // CHUNK:07d}", refs)
        records.write(chunk)
        runs.mark_enqueued(run_id, chunk.chunk_id, chunk.part_name, len(refs))
        rows = []
        for i, ref in enumerate(refs, start=k):
            if i % 50 == 49:
                rows += failure_rows(run_id, ref, Failure("InvalidImage.Content", "bad", False), 1, now)
            else:
                rec = Recognition("req", () if i % 10 == 9 else (plate,), 1920, 1080, 1920, 1080)
                rows += recognition_rows(run_id, ref, rec, 1, now)
        dataset.write_part(run_id, chunk.part_name, rows)
        books.mark(run_id, chunk.chunk_id, [Outcome(p) for p in range(len(refs))], part=chunk.part_name)


def timed_verify(env: dict[str, str], run_id: str, work: Path) -> tuple[float, float, int, dict]:
    """Wall seconds, peak RSS (MB) and exit code of ``carnumber verify RUN --json``, and its JSON."""
    out = work / "verify.json"
    started = time.monotonic()
    with out.open("w") as stdout:
        child = subprocess.Popen(
            [sys.executable, "-m", "carnumber.cli", "verify", run_id, "--json"],
            cwd=ROOT,
            env=env,
            stdout=stdout,
            stderr=subprocess.DEVNULL,
        )
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.monotonic() - started
    rc = os.waitstatus_to_exitcode(status)
    child.returncode = rc
    if rc not in (0, 1):
        raise SystemExit(f"carnumber verify exited {rc}")
    return wall, usage.ru_maxrss / 1024, rc, json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=100_000)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="carnumber-verify-bench-"))
    embedded = None
    redis_url = os.environ.get("REDIS_URL")
    if not redis_url:
        embedded = EmbeddedRedis()
        redis_url = embedded.url
    prefix = f"carnumber-verify-bench-{os.getpid()}"
    run_id = "bench"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CARNUMBER_")},
        "REDIS_URL": redis_url,
        "CARNUMBER_KEY_PREFIX": prefix,
        "CARNUMBER_OUTPUT": str(work / "out"),
    }
    try:
        started = time.monotonic()
        build(env["CARNUMBER_OUTPUT"], redis_url, prefix, run_id, args.images)
        print(f"built a run of {args.images} images in {time.monotonic() - started:.1f}s", flush=True)
        results = []
        wall, rss, rc, data = timed_verify(env, run_id, work)
        results.append(("parts", wall, rss, rc, data))
        parts = sorted((work / "out" / f"run={run_id}").glob("part-*.parquet"))
        backup = work / parts[0].name
        parts[0].rename(backup)
        shutil.copyfile(parts[1], parts[1].with_name("part-copied.parquet"))
        wall, rss, rc, data = timed_verify(env, run_id, work)
        results.append(("damaged", wall, rss, rc, data))
        parts[1].with_name("part-copied.parquet").unlink()
        backup.rename(parts[0])
        from workers.sink.compact import compact_run
        from workers.sink.dataset import open_dataset

        compact_run(open_dataset(env["CARNUMBER_OUTPUT"]), run_id)
        wall, rss, rc, data = timed_verify(env, run_id, work)
        results.append(("compacted", wall, rss, rc, data))
        print(f"{'state':<10} {'wall s':>7} {'peak MB':>8} {'exit':>4}  verdict")
        for name, wall, rss, rc, data in results:
            verdict = "OK" if data["ok"] else ", ".join(data["reasons"])
            print(f"{name:<10} {wall:>7.2f} {rss:>8.1f} {rc:>4}  {data['enqueued']} enqueued; {verdict}")
        ok = [r[3] for r in results] == [0, 1, 0]
        return 0 if ok else 1
    finally:
        import redis

        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
