"""Drill 5: a soak. Many images (200,000 by default) through two worker nodes against a server
with the retry issue's fault mix (10 % 503, 5 % throttles, 2 % hung calls, 1 % resets, 1 %
malformed bodies), sampling each node's resident memory (main process and pool) and Redis's
``used_memory`` every 10 s, reported with start, peak and end.

* Worker memory must stay flat: its peak within 1.5x the first sample taken after a tenth of
  the run (start-up allocations settled).
* Redis holds, by design, the run's answer journal: one entry per distinct picture answered, so
  that every later copy of a picture in the run is free; it is dropped when the run is done. So
  Redis must come back once the run is done: what is left beyond the start is the run's
  bookkeeping (per chunk, not per image), at most :data:`LEFT_PER_IMAGE_B` bytes per image; its
  growth during the run is reported per picture answered.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from ops.drills.faults import Result
from ops.drills.harness import Drill, Node, audit, drill_dir

__all__ = ["group_rss_mb", "soak_drill"]

FAULTS = [
    "--fault-503", "0.10", "--fault-throttle", "0.05", "--fault-hang", "0.02", "--hang-s", "3",
    "--fault-reset", "0.01", "--fault-malformed", "0.01", "--seed", "4",
]  # fmt: skip
FLAT = 1.5
LEFT_PER_IMAGE_B = 16  # per-image state left in Redis after the run would be a leak


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in process group ``pgid``, MB."""
    page_kb = os.sysconf("SC_PAGE_SIZE") / 1024
    total_kb = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ...
                total_kb += int((entry / "statm").read_text().split()[1]) * page_kb
        except (OSError, ValueError, IndexError):
            continue
    return total_kb / 1024


def _nodes_rss(nodes: list[Node]) -> float:
    return sum(group_rss_mb(n.proc.pid) for n in nodes if n.alive())


def soak_drill(args: argparse.Namespace, sample_s: float = 10.0, timeout_s: float = 7200.0) -> Result:
    d = Drill(
        drill_dir("soak"),
        images=args.images,
        lease_s=args.lease_s,
        chunk_size=args.chunk_size,
        pool=args.pool,
        concurrency=32,
        server_args=FAULTS,
        extra_env={
            "CARNUMBER_READ_TIMEOUT_S": "1.5",
            "CARNUMBER_RETRY_BASE_S": "0.2",
            "CARNUMBER_RETRY_CAP_S": "5",
        },
    )
    try:
        print(f"soak: {args.images} images, fault mix, work dir {d.work}", flush=True)
        nodes = [d.start_node(), d.start_node()]
        started = time.monotonic()
        producer = d.start_producer()
        samples: list[tuple[float, float, float, int]] = []  # (s, worker MB, redis MB, written)
        while True:
            s = d.summary()
            written = s.written if s else 0
            info = d.client.info("memory")
            samples.append(
                (time.monotonic() - started, _nodes_rss(nodes), int(info["used_memory"]) / 2**20, written)
            )
            if s is not None and d.finished(s) and producer.poll() is not None:
                time.sleep(2)  # the run's journal is dropped right after it is marked done
                info = d.client.info("memory")
                samples.append(
                    (time.monotonic() - started, _nodes_rss(nodes), int(info["used_memory"]) / 2**20, written)
                )
                break
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"soak: not finished in {timeout_s:.0f} s ({s})")
            if len(samples) % 6 == 1:
                t, w, r, n = samples[-1]
                print(f"    {t:6.0f} s  {n:7d} written  workers {w:6.1f} MB  redis {r:6.1f} MB", flush=True)
            time.sleep(sample_s)
        total = time.monotonic() - started
        settled = next((x for x in samples if x[3] >= args.images // 10), samples[0])
        workers = [x[1] for x in samples if x[3] >= settled[3]]
        peak = max(samples, key=lambda x: x[2])  # Redis's largest sample
        notes: dict[str, object] = {
            "worker_mb": {
                "start": round(settled[1], 1),
                "peak": round(max(workers), 1),
                "end": round(workers[-1], 1),
            },
            # Before the run, at its largest (the run's journal), and after the run was done.
            "redis_mb": {
                "start": round(samples[0][2], 2),
                "peak": round(peak[2], 2),
                "end": round(samples[-1][2], 2),
            },
            "redis_bytes_per_picture_at_peak": round((peak[2] - samples[0][2]) * 2**20 / max(1, peak[3])),
            "samples": len(samples),
        }
        left_b = (samples[-1][2] - samples[0][2]) * 2**20 / max(1, args.images)
        notes["redis_bytes_left_per_image"] = round(left_b, 1)
        flat = max(workers) <= FLAT * settled[1] and left_b <= LEFT_PER_IMAGE_B
        notes["flat"] = flat
        result = Result("soak", audit(d), args.images, [], total, notes)
        print(f"  memory: {notes}", flush=True)
        a = result.audit
        print(
            f"  calls per image {a.calls / max(1, a.in_output):.2f}, {a.in_output / total:.0f} images/s",
            flush=True,
        )
        return result
    finally:
        d.close()
        if not args.keep:
            shutil.rmtree(d.work, ignore_errors=True)
