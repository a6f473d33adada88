"""How the answer cache across runs scales: tens of millions of answered pictures, and what a
worker holds and reads per lookup (``workers/answer_cache.py``).

Builds a cache of ``--answers`` entries with answers of a realistic size (one plate, polygon,
sizes, the paying image's id, the run: ~330 bytes), the way nightly runs add to it: one segment
per ``--nights`` share, folded size-tiered after each. Then measures, in a fresh process so the
figures are a worker's:

* the reader's memory (RSS after opening every segment, minus before) and per answer;
* a worker's lookup for a chunk of ``--chunk`` pictures: all hits, all misses (wall time, and
  bytes read);
* the disk used per answer.

Run: ``python ops/bench/answer_cache_scale.py --answers 20000000`` (about 10 GB of disk in
``--dir``, default a temporary directory, removed at the end).

``--ingest-rows N`` measures the producer's side instead: an output of N answered images in
parts of 200 (as workers write them), then ``update_answers`` over it from scratch (the first
build over an existing dataset) and again with one more night (the nightly update): rows/s and
peak memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import pyarrow.fs as pafs

from workers import answer_cache


def _key(i: int) -> str:
    return "sha256:" + hashlib.sha256(i.to_bytes(8, "big")).hexdigest()


def _payload(i: int) -> bytes:
    doc = {
        "by": hashlib.sha256(b"img" + i.to_bytes(8, "big")).hexdigest()[:32],
        "run": "2026-11-30",
        "rec": {
            "request_id": f"4C7C0D2B-{i:08d}-4B8E-9D8F-1A2B3C4D5E6F",
            "plates": [
                {
                    "text": f"浙A{i % 100000:05d}",
                    "prob": 0.9871,
                    "plate_type": "蓝牌",
                    "type_prob": 0.9523,
                    "polygon": [[412, 520], [588, 522], [587, 571], [411, 569]],
                }
            ],
            "width": 1920,
            "height": 1080,
            "org_width": 1920,
            "org_height": 1080,
            "score": None,
        },
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def build(directory: str, answers: int, nights: int, batch: int) -> dict[str, float]:
    fs = pafs.LocalFileSystem()
    started = time.monotonic()
    per_night = -(-answers // nights)
    merge_s = 0.0
    for night in range(nights):
        lo, hi = night * per_night, min(answers, (night + 1) * per_night)
        for start in range(lo, hi, batch):
            entries = [(_key(i), _payload(i)) for i in range(start, min(hi, start + batch))]
            answer_cache.add_segment(fs, directory, entries)
        t = time.monotonic()
        answer_cache.merge(fs, directory, max_segments=4)
        merge_s += time.monotonic() - t
        print(
            f"  night {night + 1}/{nights}: {hi:,} answers, "
            f"{len(answer_cache.read_manifest(fs, directory))} segments",
            flush=True,
        )
    return {
        "build_s": round(time.monotonic() - started, 1),
        "merge_s": round(merge_s, 1),
        "peak_rss_mb_builder": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def probe(directory: str, answers: int, chunk: int, rounds: int) -> dict[str, float]:
    """In a fresh process: what a worker holds and how long a chunk's lookup takes."""
    fs = pafs.LocalFileSystem()
    before = _rss_kb()
    cache = answer_cache.AnswerCache(fs, directory)
    entries = cache.entries()
    held_kb = _rss_kb() - before
    import random

    rng = random.Random(7)
    hit_s: list[float] = []
    miss_s: list[float] = []
    for _ in range(rounds):
        hits = [_key(i) for i in rng.sample(range(answers), chunk)]
        t = time.perf_counter()
        found = cache.lookup(hits)
        hit_s.append(time.perf_counter() - t)
        assert len(found) == chunk, f"{len(found)} of {chunk} hits found"
        misses = [_key(answers + rng.randrange(10**9)) for _ in range(chunk)]
        t = time.perf_counter()
        assert cache.lookup(misses) == {}
        miss_s.append(time.perf_counter() - t)
    hit_s.sort()
    miss_s.sort()
    return {
        "entries": entries,
        "segments": len(answer_cache.read_manifest(fs, directory)),
        "reader_rss_mb": round(held_kb / 1024, 2),
        "reader_bytes_per_answer": round(held_kb * 1024 / max(1, entries), 3),
        "chunk_lookup_hits_ms_median": round(hit_s[len(hit_s) // 2] * 1000, 2),
        "chunk_lookup_hits_ms_p95": round(hit_s[int(len(hit_s) * 0.95)] * 1000, 2),
        "chunk_lookup_misses_ms_median": round(miss_s[len(miss_s) // 2] * 1000, 2),
        "bytes_read_per_hit": answer_cache.FENCE * answer_cache.RECORD.itemsize + len(_payload(0)) + 64,
    }


def ingest(rows: int, night_rows: int, base: str) -> dict[str, float]:
    """The producer's update over an output of ``rows`` answered images, then one more night."""
    from datetime import UTC, datetime

    from producers.answer_index import update_answers
    from workers.api.response import Plate, Recognition
    from workers.message import ImageRef
    from workers.sink.dataset import open_dataset
    from workers.sink.rows import recognition_rows

    output = os.path.join(base, "out")
    dataset = open_dataset(output)
    now = datetime.now(UTC)

    def write(run_id: str, lo: int, hi: int) -> None:
        for start in range(lo, hi, 200):
            part = []
            for i in range(start, min(hi, start + 200)):
                rec = Recognition(
                    f"req-{i}",
                    (Plate(f"浙A{i % 100000:05d}", 0.98, "蓝牌", 0.95, ((1, 2), (3, 2), (3, 4), (1, 4))),),
                    1920,
                    1080,
                    1920,
                    1080,
                )
                ref = ImageRef(f"file:///archive/cam-{i % 97}/{i:09d}.jpg")
                part += recognition_rows(run_id, ref, rec, 1, now, content_key=_key(i))
            dataset.write_part(run_id, f"part-{start:09d}", part)

    write("history", 0, rows)
    t = time.monotonic()
    update_answers(output)
    first_s = time.monotonic() - t
    write("tonight", rows, rows + night_rows)
    t = time.monotonic()
    nightly = update_answers(output)
    nightly_s = time.monotonic() - t
    return {
        "ingest_rows": rows,
        "first_build_s": round(first_s, 1),
        "first_build_rows_per_s": round(rows / first_s),
        "nightly_rows": night_rows,
        "nightly_update_s": round(nightly_s, 1),
        "nightly_files_read": nightly.files_ingested,
        "entries": nightly.entries,
        "segments": nightly.segments,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--answers", type=int, default=20_000_000)
    ap.add_argument("--nights", type=int, default=8, help="segments added one night at a time")
    ap.add_argument("--batch", type=int, default=500_000, help="answers per new segment")
    ap.add_argument("--chunk", type=int, default=200, help="pictures per lookup (a chunk)")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--dir", help="where to build (default: a temporary directory, removed)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--ingest-rows", type=int, help="measure the producer's update instead")
    ap.add_argument("--night-rows", type=int, default=288_000, help="with --ingest-rows: one night")
    ap.add_argument("--probe", help=argparse.SUPPRESS)  # internal: the fresh reader process
    args = ap.parse_args()
    if args.ingest_rows:
        base = args.dir or tempfile.mkdtemp(prefix="carnumber-ingest-bench-")
        try:
            figures = ingest(args.ingest_rows, args.night_rows, base)
        finally:
            if not args.dir:
                shutil.rmtree(base, ignore_errors=True)
        print(json.dumps(figures) if args.json else "\n".join(f"  {k:<26}{v}" for k, v in figures.items()))
        return 0
    if args.probe:
        print(json.dumps(probe(args.probe, args.answers, args.chunk, args.rounds)))
        return 0
    base = args.dir or tempfile.mkdtemp(prefix="carnumber-cache-bench-")
    directory = os.path.join(base, "_answers", "v1")
    try:
        print(f"building a cache of {args.answers:,} answers in {directory}", flush=True)
        figures: dict[str, object] = {
            "answers": args.answers,
            **build(directory, args.answers, args.nights, args.batch),
        }
        disk = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
        figures["disk_bytes_per_answer"] = round(disk / args.answers, 1)
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--probe",
                directory,
                "--answers",
                str(args.answers),
                "--chunk",
                str(args.chunk),
                "--rounds",
                str(args.rounds),
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        figures.update(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            print(f"  {k:<34}{v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
