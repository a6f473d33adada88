"""Producer-side peak memory and rate: ``open_source`` + ledger lookups, one subprocess per case.

Cases (each in a fresh Python process, so peak RSS is that case's alone):

* ``manifest-<n>``: a CSV manifest of ``n`` rows (``url`` + two metadata columns), iterated
  through :func:`producers.sources.open_source` in chunks of 200 with
  :meth:`producers.ledger.Ledger.answered` per chunk, against an output dataset in which every
  10th image of the manifest was already answered by an earlier run;
* ``ledger-build``: :meth:`Ledger.open` with ``rebuild=True`` over that dataset (the nightly
  update is the same work on fewer files);
* ``s3-<n>``: a listing of ``n`` objects under one prefix on moto's S3 server on loopback (the
  objects are created in moto's in-process backend to save time; the listing itself goes over
  HTTP through boto3), with the same ledger lookups.

Peak RSS is the child's ``VmHWM`` (Linux); ``base`` is its RSS after imports, before the source
is opened. The enqueue/broker part is not measured here (it is the producer's, not the source's).

Usage::

    python ops/bench/producer_memory.py                      # 10k and 1M manifests, 100k S3
    python ops/bench/producer_memory.py --sizes 10000,100000 --s3-objects 20000
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 200


def _rss_mb() -> float:
    """Peak RSS of this process image (VmHWM). Not ``ru_maxrss``: after fork + exec that still
    counts the parent's RSS at fork time, which would charge moto's objects to the child."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- child ---------------------------------------------------------------------------------


def child(case: str, source: str, output: str, env: dict[str, str]) -> dict[str, Any]:
    from producers.ledger import Ledger
    from producers.sources import open_source
    from workers.config import Settings

    if case == "ledger-build":
        base = _current_rss_mb()
        started = time.perf_counter()
        ledger = Ledger.open(output, rebuild=True)
        seconds = time.perf_counter() - started
        return {
            "case": case,
            "rows": ledger.stats.rows_ingested,
            "files": ledger.stats.files_ingested,
            "seconds": round(seconds, 2),
            "rate_per_s": round(ledger.stats.rows_ingested / seconds),
            "base_rss_mb": round(base, 1),
            "peak_rss_mb": round(_rss_mb(), 1),
        }
    settings = Settings.from_env(env)
    import boto3  # noqa: F401 - imported before the baseline so S3 and manifests compare fairly
    import botocore  # noqa: F401

    base = _current_rss_mb()
    started = time.perf_counter()
    ledger = Ledger.open(output, exclude_run="tonight")
    refs = open_source(source, settings)
    seen = answered = 0
    batch: list[str] = []
    for ref in refs:
        batch.append(ref.image_id)
        if len(batch) == CHUNK:
            answered += len(ledger.answered(batch))
            seen += len(batch)
            batch = []
    if batch:
        answered += len(ledger.answered(batch))
        seen += len(batch)
    seconds = time.perf_counter() - started
    return {
        "case": case,
        "refs": seen,
        "answered": answered,
        "seconds": round(seconds, 2),
        "rate_per_s": round(seen / seconds),
        "base_rss_mb": round(base, 1),
        "peak_rss_mb": round(_rss_mb(), 1),
    }


# -- parent --------------------------------------------------------------------------------


def write_manifest(path: Path, n: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["url", "camera", "captured_at"])
        for i in range(n):
            w.writerow(
                [
                    f"oss://archive/cam{i % 97:02d}/2026-11-23/{i:08d}.jpg",
                    f"cam{i % 97}",
                    "2026-11-23T00:00:00",
                ]
            )


def write_answers(output: Path, n: int) -> int:
    """An earlier run answered every 10th image of the largest manifest: parts of 1000 rows."""
    from workers.message import ImageRef
    from workers.sink.dataset import open_dataset

    ds = open_dataset(str(output))
    now = datetime.now(UTC)
    part: list[dict[str, Any]] = []
    written = 0
    for i in range(0, n, 10):
        ref = ImageRef(f"oss://archive/cam{i % 97:02d}/2026-11-23/{i:08d}.jpg")
        part.append(
            {
                "run_id": "earlier",
                "image_id": ref.image_id,
                "source": ref.source,
                "status": "ok",
                "attempts": 1,
                "processed_at": now,
            }
        )
        if len(part) == 1000:
            ds.write_part("earlier", f"part-{written:07d}-bench", part)
            written += 1
            part = []
    if part:
        ds.write_part("earlier", f"part-{written:07d}-bench", part)
    return n // 10


def run_child(case: str, source: str, output: str, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", case, "--source", source, "--output", output]
    out = subprocess.run(
        cmd, env={**os.environ, **env}, capture_output=True, text=True, cwd=ROOT, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"{case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,1000000", help="manifest rows, comma-separated")
    parser.add_argument("--s3-objects", type=int, default=100_000, help="0 to skip the S3 case")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(child(args.child, args.source, args.output, dict(os.environ))))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cn-bench-") as tmp:
        output = Path(tmp) / "output"
        t = time.perf_counter()
        answered = write_answers(output, max(sizes))
        print(f"dataset: {answered} answered images in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        results.append(run_child("ledger-build", "-", str(output), {}))
        print(results[-1], file=sys.stderr)
        env = {"CARNUMBER_OSS_ENDPOINT": "oss-cn-hangzhou.aliyuncs.com"}
        for n in sizes:
            manifest = Path(tmp) / f"manifest-{n}.csv"
            write_manifest(manifest, n)
            results.append(run_child(f"manifest-{n}", str(manifest), str(output), env))
            print(results[-1], file=sys.stderr)
            manifest.unlink()
        if args.s3_objects:
            results.append(s3_case(args.s3_objects, str(output)))
            print(results[-1], file=sys.stderr)
    manifests = [r for r in results if r["case"].startswith("manifest-")]
    if len(manifests) >= 2:
        ratio = manifests[-1]["peak_rss_mb"] / manifests[0]["peak_rss_mb"]
        verdict = "ok" if ratio <= 1.2 else "OVER TARGET"
        big, small = manifests[-1]["case"], manifests[0]["case"]
        print(f"peak RSS {big} / {small} = {ratio:.3f} (target <= 1.2: {verdict})")
    for r in results:
        print(json.dumps(r))
    return 0


def s3_case(n: int, output: str) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.s3_server import S3_ENV, moto_s3
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    with moto_s3() as endpoint:
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
        backend.create_bucket("cn-bench", "us-east-1")
        for i in range(n):
            backend.put_object("cn-bench", f"cam{i % 97:02d}/2026-11-23/{i:08d}.jpg", b"x")
        env = {**S3_ENV, "CARNUMBER_S3_ENDPOINT_URL": endpoint}
        return run_child(f"s3-{n}", "s3://cn-bench/", output, env)


if __name__ == "__main__":
    raise SystemExit(main())
