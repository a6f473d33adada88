"""``carnumber plan`` at scale: time and peak memory over a big manifest and a big S3 prefix.

Each case runs :func:`producers.plan.make_plan` + :func:`producers.plan.bill` in a fresh child
process (peak RSS = that case alone: ``VmHWM``; ``base`` = RSS after imports):

* ``manifest-<n>``: a CSV manifest of ``n`` rows (``url`` = an https URL, two metadata columns;
  one row in 100 repeats an earlier URL), against an output dataset in which an earlier run
  answered every 10th image. URLs are never fetched: plan checks them (``check_url``), looks
  them up in the ledger and dedups them by source in its on-disk key set;
* ``s3-<n>``: a prefix of ``n`` objects on moto's S3 server on loopback (created in moto's
  in-process backend to save time; the listing goes over HTTP through boto3). ``--s3-read
  listing`` (default) plans from the listing alone (sizes, ETag + size duplicates: one object in
  100 is a copy); ``--s3-read url`` also does the ranged head/tail reads of ``Url`` mode for every
  object (moto answers ~100 objects/s here, so keep ``n`` small).

    python ops/bench/plan_scale.py                       # 10k + 1M manifest rows, 100k objects
    python ops/bench/plan_scale.py --sizes 10000 --s3-objects 5000 --s3-read url
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _peak_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(case: str, source: str, output: str, listing_only: bool) -> dict[str, Any]:
    import boto3  # noqa: F401 - before the baseline, so the cases compare fairly
    import botocore  # noqa: F401

    from producers.ledger import Ledger
    from producers.plan import QuotaView, bill, make_plan, plan_items
    from workers.config import Settings

    settings = Settings.from_env()
    base = _rss_mb()
    started = time.perf_counter()
    with Ledger.open(output, exclude_run="tonight") as ledger:
        report = make_plan(
            plan_items(source, settings),
            settings,
            source=source,
            ledger=ledger,
            listing_only=listing_only,
        )
    bill(report, settings, QuotaView(limit=settings.quota, window=settings.quota_window))
    seconds = time.perf_counter() - started
    return {
        "case": case,
        "listed": report.listed,
        "answered_earlier": report.answered_earlier,
        "rejected": report.rejected,
        "duplicates": report.duplicates,
        "calls": report.calls,
        "bytes_read": report.bytes_read,
        "seconds": round(seconds, 1),
        "rate_per_s": round(report.listed / seconds),
        "base_rss_mb": round(base, 1),
        "peak_rss_mb": round(_peak_mb(), 1),
        "verdict": report.verdict,
    }


def write_manifest(path: Path, n: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["url", "camera", "captured_at"])
        for i in range(n):
            j = i - 1 if i % 100 == 99 else i  # one row in 100 repeats the one before
            w.writerow(
                [
                    f"https://cdn.example.com/cam{j % 97:02d}/2026-11-23/{j:08d}.jpg",
                    f"cam{j % 97}",
                    "2026-11-23T00:00:00",
                ]
            )


def write_answers(output: Path, n: int) -> None:
    """An earlier run answered every 10th image of the manifest: parts of 1000 rows."""
    from workers.message import ImageRef
    from workers.sink.dataset import open_dataset

    ds = open_dataset(str(output))
    now = datetime.now(UTC)
    part: list[dict[str, Any]] = []
    written = 0
    for i in range(0, n, 10):
        ref = ImageRef(f"https://cdn.example.com/cam{i % 97:02d}/2026-11-23/{i:08d}.jpg")
        row = {"run_id": "earlier", "image_id": ref.image_id, "source": ref.source}
        part.append({**row, "status": "ok", "attempts": 1, "processed_at": now})
        if len(part) == 1000:
            ds.write_part("earlier", f"part-{written:07d}-bench", part)
            written, part = written + 1, []
    if part:
        ds.write_part("earlier", f"part-{written:07d}-bench", part)


def run_child(case: str, source: str, output: str, env: dict[str, str], listing_only: bool) -> Any:
    cmd = [sys.executable, __file__, "--child", case, "--source", source, "--output", output]
    if listing_only:
        cmd.append("--listing-only")
    out = subprocess.run(
        cmd, env={**os.environ, **env}, capture_output=True, text=True, cwd=ROOT, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"{case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def s3_case(n: int, output: str, read: str) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.s3_server import S3_ENV, moto_s3
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    from ocrserver.truth import make_test_image

    images = [make_test_image([{"text": f"苏E{i:05d}", "type": "小型汽车"}]) for i in range(50)]
    with moto_s3() as endpoint:
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
        backend.create_bucket("cn-plan-bench", "us-east-1")
        for i in range(n):
            # distinct bytes per object (a counter in a trailing comment), a copy one in 100
            j = i - 1 if i % 100 == 99 else i
            body = images[j % len(images)] + f"#{j}".encode()
            backend.put_object("cn-plan-bench", f"cam{i % 97:02d}/2026-11-23/{i:08d}.png", body)
        env = {**S3_ENV, "CARNUMBER_S3_ENDPOINT_URL": endpoint, "CARNUMBER_S3_MODE": "url"}
        case = f"s3-{n}-{read}"
        return run_child(case, "s3://cn-plan-bench/", output, env, listing_only=read == "listing")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,1000000", help="manifest rows, comma-separated")
    parser.add_argument("--s3-objects", type=int, default=100_000, help="0 to skip the S3 case")
    parser.add_argument("--s3-read", choices=("listing", "url"), default="listing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--listing-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        print(json.dumps(child(args.child, args.source, args.output, args.listing_only)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s]
    results = []
    with tempfile.TemporaryDirectory(prefix="cn-plan-bench-") as tmp:
        output = Path(tmp) / "output"
        if sizes:
            write_answers(output, max(sizes))
        env = {"CARNUMBER_QPS": "10", "CARNUMBER_QUOTA": "200000"}
        for n in sizes:
            manifest = Path(tmp) / f"manifest-{n}.csv"
            write_manifest(manifest, n)
            results.append(run_child(f"manifest-{n}", str(manifest), str(output), env, False))
            print(json.dumps(results[-1]), file=sys.stderr)
            manifest.unlink()
        if args.s3_objects:
            results.append(s3_case(args.s3_objects, str(output), args.s3_read))
            print(json.dumps(results[-1]), file=sys.stderr)
    manifests = [r for r in results if r["case"].startswith("manifest-")]
    if len(manifests) >= 2:
        ratio = manifests[-1]["peak_rss_mb"] / manifests[0]["peak_rss_mb"]
        print(f"peak RSS {manifests[-1]['case']} / {manifests[0]['case']} = {ratio:.3f}")
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
