"""``carnumber demo`` — the whole product on one machine, with nothing to start by hand.

Generates a sample archive of rendered plates in street-like scenes, starts an embedded Redis
(unless ``REDIS_URL`` is set), the local RecognizeCarNumber server with the offline recognizer,
and a Celery worker; enqueues the archive, waits, compacts, checks every image is accounted for
exactly once, and prints a summary with a DuckDB query to try.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import time
from pathlib import Path

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images", type=int, default=120, help="sample images to generate (default 120)"
    )
    parser.add_argument(
        "--out", default="carnumber-demo", help="working directory (default ./carnumber-demo)"
    )
    parser.add_argument(
        "--recognizer",
        default="auto",
        help="server recognizer: onnx, replay, or auto (onnx when installed)",
    )
    parser.add_argument(
        "--qps", type=float, default=10.0, help="account QPS, enforced by server and fleet"
    )
    parser.add_argument("--worker-processes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout-s", type=float, default=600.0)


def _recognizer(choice: str) -> str:
    if choice != "auto":
        return choice
    try:
        import cv2  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return "replay"
    return "onnx"


def main(args: argparse.Namespace) -> int:
    from carnumber.embedded_redis import EmbeddedRedis
    from carnumber.localstack import start_server, start_worker
    from ocrserver.samples import generate_archive

    out = Path(args.out).resolve()
    archive = out / "archive"
    recognizer = _recognizer(args.recognizer)
    print(f"[1/6] generating {args.images} sample images in {archive} ...", flush=True)
    started = time.monotonic()
    shutil.rmtree(archive, ignore_errors=True)  # ours, from an earlier demo: start from a clean archive
    generate_archive(archive, count=args.images, seed=args.seed)
    print(f"      done in {time.monotonic() - started:.1f}s", flush=True)

    with contextlib.ExitStack() as stack:
        redis_url = os.environ.get("REDIS_URL")
        if redis_url:
            print("[2/6] using Redis at REDIS_URL", flush=True)
        else:
            embedded = EmbeddedRedis()
            stack.callback(embedded.stop)
            redis_url = embedded.url
            print(f"[2/6] started an embedded Redis on {redis_url}", flush=True)

        key_id, secret = "demo", secrets.token_hex(16)
        # The key goes by environment, not argv: command lines are visible to every local user.
        server = start_server(
            ["--recognizer", recognizer, "--qps", str(args.qps)],
            env={"CARNUMBER_SERVER_KEYS": f"{key_id}:{secret}"},
        )
        stack.callback(server.stop)
        print(
            f"[3/6] local RecognizeCarNumber server ({recognizer} recognizer) on {server.url}",
            flush=True,
        )

        run_id = time.strftime("demo-%Y%m%dT%H%M%S")
        env = {
            "REDIS_URL": redis_url,
            "CARNUMBER_ENDPOINT": server.url or "",
            "ALIBABA_CLOUD_ACCESS_KEY_ID": key_id,
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": secret,
            "CARNUMBER_OUTPUT": str(out / "output"),
            "CARNUMBER_QUEUE": "carnumber-demo",
            "CARNUMBER_KEY_PREFIX": "carnumber-demo",
            "CARNUMBER_QPS": str(args.qps),
            "CARNUMBER_CHUNK_SIZE": "20",
        }
        worker = start_worker(env, concurrency=args.worker_processes, hostname="demo@%h")
        stack.callback(worker.stop)
        print(
            f"[4/6] Celery worker started ({args.worker_processes} processes); enqueueing run {run_id}",
            flush=True,
        )

        summary = _run(env, run_id, archive, args.timeout_s)
    print(summary)
    return 0


def _run(env: dict[str, str], run_id: str, archive: Path, timeout_s: float) -> str:
    import io

    from carnumber.commands.common import configure_celery, connect_redis, run_store
    from carnumber.commands.status import follow
    from carnumber.progress import Progress
    from producers.enqueue import EnqueueTracker, enqueue_to_broker
    from producers.sources import open_source
    from workers.config import Settings
    from workers.errors import CarnumberError
    from workers.sink.compact import compact_run
    from workers.sink.dataset import open_dataset
    from workers.sink.enqueued import recorder

    settings = Settings.from_env(env)
    client = connect_redis(settings)
    runs = run_store(settings, client)
    configure_celery(settings)
    started = time.monotonic()
    runs.create(run_id, str(archive))
    argv = ["carnumber", "enqueue", str(archive), "--run", run_id, "--glob", "*.jpg"]
    with EnqueueTracker(runs, run_id, str(archive), argv) as tracker:
        tracker.report = report = enqueue_to_broker(
            open_source(str(archive), settings, glob="*.jpg"),
            run_id,
            settings=settings,
            redis_client=client,
            runs=runs,
            record=recorder(settings.output),
        )
    log = io.StringIO()
    with Progress(f"demo run {run_id}", total=report.images_enqueued, unit="images", every_s=10) as bar:
        status = follow(
            runs,
            run_id,
            out=log,
            interval_s=0.5,
            timeout_s=timeout_s,
            on_update=lambda s: bar.update(completed=s.written, failed=int(s.fields.get("images_failed", 0))),
        )
    elapsed = time.monotonic() - started
    if status != 0:
        raise CarnumberError(f"run {run_id} did not finish: {log.getvalue().splitlines()[-1]}")
    print(
        f"[5/6] {report.images_enqueued} images processed in {elapsed:.1f}s; compacting", flush=True
    )

    dataset = open_dataset(settings.output)
    compacted = compact_run(dataset, run_id)
    table = dataset.read_run(run_id).to_pylist()
    print("[6/6] checking the output against the archive's truth", flush=True)
    return _summary(
        table,
        archive,
        report.images_enqueued,
        elapsed,
        compacted.files_out,
        dataset.run_dir(run_id),
        run_id,
    )


def _summary(
    rows: list[dict],
    archive: Path,
    enqueued: int,
    elapsed: float,
    files: int,
    run_dir: str,
    run_id: str,
) -> str:
    from workers.errors import CarnumberError

    images = {r["image_id"] for r in rows}
    if len(images) != enqueued:
        raise CarnumberError(f"output has {len(images)} images but {enqueued} were enqueued")
    plates = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] == "failed"]
    truth = {}
    with contextlib.suppress(FileNotFoundError):
        for line in (archive / "truth.jsonl").read_text(encoding="utf-8").splitlines():
            item = json.loads(line)
            truth[item["name"]] = {p["text"] for p in item["plates"]}
    read = {(Path(r["source"]).name, r["plate"]) for r in plates}
    expected = {(name, text) for name, texts in truth.items() for text in texts}
    correct = len(read & expected)
    lines = [
        "",
        "carnumber demo: done",
        f"  images      {len(images)} (every one accounted for exactly once)",
        f"  plates      {len(plates)} read; {correct}/{len(expected)} true plates read exactly "
        f"({100.0 * correct / max(1, len(expected)):.0f}%)",
        f"  no plate    {sum(1 for r in rows if r['status'] == 'no_plate')}",
        f"  failures    {len(failed)}",
        f"  throughput  {len(images) / elapsed:.1f} images/s end to end (account QPS limit applies)",
        f"  parquet     {run_dir} ({files} file(s))",
        "",
        "Try (pip install duckdb for the first):",
        f"  python -c \"import duckdb; duckdb.sql(\\\"SELECT plate, plate_type, plate_prob, source "
        f"FROM '{run_dir}/*.parquet' WHERE status = 'ok' LIMIT 10\\\").show()\"",
        f"  python -c \"import pyarrow.parquet as pq; "
        f"print(pq.read_table('{run_dir}').select(['plate', 'plate_type', 'source']).slice(0, 5))\"",
        f"  (run id: {run_id})",
    ]
    return "\n".join(lines)
