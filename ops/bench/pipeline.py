"""End-to-end throughput: producer → Celery workers → local server (replay) → Parquet.

Prints images/s end to end and, in the same run, the ceiling: what a bare async httpx loop
(signed requests, same images, same server) gets from the server on this machine. Then
compacts the run and checks every image is in the output exactly once.

    python ops/bench/pipeline.py                      # 20,000 images, 2 worker processes
    python ops/bench/pipeline.py --images 2000 --ceiling-s 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

from carnumber.commands.common import configure_celery, connect_redis, run_store
from carnumber.embedded_redis import EmbeddedRedis
from carnumber.localstack import start_server, start_worker
from ocrserver.truth import distinct_copy, make_test_image
from workers.api.client import AsyncClient, Image
from workers.config import Credentials, Settings

KEY_ID, SECRET = "benchid", "benchsecret"


def make_archive(folder: Path, n: int, distinct: int = 200) -> list[bytes]:
    """``n`` image files over ``distinct`` pictures, each with a plate and bytes of its own
    (``distinct_copy``: copies of one picture would be called once)."""
    folder.mkdir(parents=True)
    pool = []
    for i in range(distinct):
        data = make_test_image([{"text": f"苏E{i:05d}", "type": "小型汽车"}])
        path = folder / f"pool-{i:04d}.png"
        path.write_bytes(data)
        pool.append(data)
    for i in range(n - distinct):
        (folder / f"img-{i:07d}.png").write_bytes(distinct_copy(pool[i % distinct], i))
    return pool


async def ceiling(url: str, bodies: list[bytes], seconds: float, concurrency: int) -> float:
    """Requests/s of a bare signed async loop against the server."""
    creds = Credentials(KEY_ID, SECRET)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    done = 0
    async with httpx.AsyncClient(limits=limits, timeout=30) as http:
        client = AsyncClient(url, creds, http)
        deadline = time.monotonic() + seconds

        async def loop(i: int) -> None:
            nonlocal done
            while time.monotonic() < deadline:
                await client.recognize(Image(body=bodies[(i + done) % len(bodies)]))
                done += 1

        started = time.monotonic()
        await asyncio.gather(*(loop(i) for i in range(concurrency)))
        return done / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--worker-processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight per worker process")
    parser.add_argument("--chunk-size", type=int, default=200)
    parser.add_argument("--ceiling-s", type=float, default=10.0)
    args = parser.parse_args()

    from producers.enqueue import enqueue_to_broker
    from producers.sources import open_source
    from workers.sink.compact import compact_run
    from workers.sink.dataset import open_dataset
    from workers.sink.enqueued import recorder

    work = Path(tempfile.mkdtemp(prefix="carnumber-bench-"))
    redis = None
    children = []
    try:
        print(f"generating {args.images} images ...", flush=True)
        bodies = make_archive(work / "archive", args.images)
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            redis = EmbeddedRedis()
            redis_url = redis.url
        server = start_server(["--keys", f"{KEY_ID}:{SECRET}", "--qps", "0"])
        children.append(server)
        assert server.url
        rps = asyncio.run(ceiling(server.url, bodies, args.ceiling_s, 64))
        print(f"ceiling: bare async httpx loop, 64 in flight: {rps:.0f} requests/s", flush=True)

        env = {
            "REDIS_URL": redis_url,
            "CARNUMBER_ENDPOINT": server.url,
            "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET,
            "CARNUMBER_OUTPUT": str(work / "out"),
            "CARNUMBER_QUEUE": "carnumber-bench",
            "CARNUMBER_KEY_PREFIX": f"carnumber-bench-{os.getpid()}",
            "CARNUMBER_QPS": "0",
            "CARNUMBER_CHUNK_SIZE": str(args.chunk_size),
            "CARNUMBER_CONCURRENCY": str(args.concurrency),
        }
        settings = Settings.from_env(env)
        client = connect_redis(settings)
        client.delete(settings.queue)
        runs = run_store(settings, client)
        configure_celery(settings)
        worker = start_worker(env, concurrency=args.worker_processes, hostname="bench@%h")
        children.append(worker)
        time.sleep(3)  # let the worker connect before the clock starts

        run_id = "bench"
        started = time.monotonic()
        runs.create(run_id, "bench")
        enqueue_to_broker(
            open_source(str(work / "archive"), settings),
            run_id,
            settings=settings,
            redis_client=client,
            runs=runs,
            record=recorder(settings.output),
        )
        runs.touch(run_id)
        while True:
            s = runs.get(run_id)
            if s and s.written >= args.images:
                break
            if worker.proc.poll() is not None:
                print("\n".join(worker.lines[-30:]))
                return 1
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        ips = args.images / elapsed
        dataset = open_dataset(settings.output)
        report = compact_run(dataset, run_id)
        table = dataset.read_run(run_id, columns=["image_id", "plate"])
        exact = report.images == args.images and table.num_rows == args.images
        print()
        print("| measure | value |")
        print("| --- | --- |")
        print(f"| images | {args.images} |")
        print(f"| pipeline, end to end | {ips:.0f} images/s ({elapsed:.1f} s) |")
        print(f"| ceiling, bare async httpx loop | {rps:.0f} requests/s |")
        print(f"| pipeline / ceiling | {ips / rps:.0%} |")
        print(f"| every image exactly once after compaction | {'yes' if exact else 'NO'} "
              f"({report.images} images, {table.num_rows} rows) |")
        client.delete(*client.keys(f"{settings.key_prefix}:*") or ["_"])
        return 0 if exact else 1
    finally:
        for child in reversed(children):
            child.stop()
        if redis is not None:
            redis.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
