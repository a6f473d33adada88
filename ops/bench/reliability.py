"""Reliability under injected faults, and the fleet stop on a wrong secret.

Two scenarios against the local server (child process), real Celery worker processes, Redis
and Parquet:

1. **Fault run**: every image through a server that answers 10 % of calls with 503, 5 % with
   ``Throttling.User``, holds 2 % without answering (the workers' read timeout fires), resets 1 %
   and cuts 1 % of bodies in half (seeded). Then: images with a result, with a terminal error (by
   code), missing (must be 0), duplicate ``(image_id, plate_index)`` rows across the part files
   *before* compaction and after it (must be 0), calls per image (server requests / images, and
   the ``attempts`` column's mean and max, which must not pass ``max_attempts``).
2. **Wrong-secret run**: the same images, workers with a wrong AccessKey secret. How many calls
   reached the server before the fleet stopped (bound: the workers' total concurrency plus one
   per worker process), images failed (must be 0), the run state and its stop code, images parked
   (must equal images enqueued). Then workers with the right secret, ``carnumber resume RUN``,
   and the same checks as the fault run: every image exactly once.

    python ops/bench/reliability.py                           # 20,000 images, both scenarios
    python ops/bench/reliability.py --images 1000 --only fault
    python ops/bench/reliability.py --images 1000 --concurrency 8 --only secret
    python ops/bench/reliability.py --only fault --pool threads --worker-processes 4 --concurrency 64

Prints a markdown table; exits 1 if an invariant fails. ``REDIS_URL`` selects a Redis (keys under
a fresh prefix, deleted afterwards); unset, an embedded one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis

from carnumber.embedded_redis import EmbeddedRedis
from carnumber.localstack import Child, start_server, start_worker
from ocrserver.server import ServerProcess
from ocrserver.truth import write_test_archive
from workers.books.runs import RunStore, RunSummary
from workers.config import Settings
from workers.keys import Keys
from workers.sink.dataset import Dataset, open_dataset

__all__ = ["Audit", "audit", "duplicate_rows", "main"]

KEY_ID, SECRET = "reliabid", "reliab-secret-0123456789"
WRONG_SECRET = "not-the-secret-9876543210"


# --- inputs ------------------------------------------------------------------------------------
# --- checks over the output --------------------------------------------------------------------
def duplicate_rows(table: pa.Table) -> int:
    """Rows beyond the first per ``(image_id, plate_index)`` (a null index counts as one key)."""
    if table.num_rows == 0:
        return 0
    keyed = pa.table({"image_id": table["image_id"], "plate_index": pc.fill_null(table["plate_index"], -1)})
    groups = keyed.group_by(["image_id", "plate_index"]).aggregate([])
    return table.num_rows - groups.num_rows


@dataclass(frozen=True, slots=True)
class Audit:
    """What one run's output says; ``*_before`` are over the part files before compaction."""

    images: int
    parts_before: int
    rows_before: int
    duplicates_before: int
    images_with_several_outcomes_before: int
    rows_after: int
    duplicates_after: int
    answered: int
    failed_by_code: dict[str, int]
    missing: int
    unexpected: int
    attempts_sum: int
    attempts_mean: float
    attempts_max: int
    over_max_attempts: int
    chunk_span_s: float  # median over parts: first to last image written
    chunk_tail_s: float  # median over parts: 90th-percentile image to the last one

    @property
    def failed(self) -> int:
        return sum(self.failed_by_code.values())


def audit(output: str, run_id: str, expected_ids: set[str], max_attempts: int) -> Audit:
    """Read ``run_id``'s parts, count duplicates, compact, and check every image is there once."""
    from workers.sink.compact import compact_run

    dataset = open_dataset(output)
    parts = dataset.parquet_files(dataset.run_dir(run_id))
    span_s, tail_s = chunk_tails(dataset, parts)
    before = dataset.read_run(run_id, columns=["image_id", "plate_index", "status"])
    # Two outcomes of one image (a redelivery, a resume that re-ran an answered image) are hidden
    # by compaction, which keeps the best: so count them before.
    duplicates_before = duplicate_rows(before)
    several_before = _several_outcomes(before)
    compact_run(dataset, run_id)
    after = dataset.read_run(run_id, columns=["image_id", "plate_index", "status", "error_code", "attempts"])
    first = after.group_by("image_id", use_threads=False).aggregate(
        [("status", "first"), ("error_code", "first"), ("attempts", "max")]
    )
    ids = set(first["image_id"].to_pylist())
    failed = first.filter(pc.equal(first["status_first"], "failed"))
    attempts = first["attempts_max"].to_pylist()
    return Audit(
        images=len(ids),
        parts_before=len(parts),
        rows_before=before.num_rows,
        duplicates_before=duplicates_before,
        images_with_several_outcomes_before=several_before,
        rows_after=after.num_rows,
        duplicates_after=duplicate_rows(after),
        answered=first.num_rows - failed.num_rows,
        failed_by_code=dict(Counter(failed["error_code_first"].to_pylist())),
        missing=len(expected_ids - ids),
        unexpected=len(ids - expected_ids),
        attempts_sum=sum(attempts),
        attempts_mean=sum(attempts) / len(attempts) if attempts else 0.0,
        attempts_max=max(attempts, default=0),
        over_max_attempts=sum(1 for a in attempts if a > max_attempts),
        chunk_span_s=span_s,
        chunk_tail_s=tail_s,
    )


def chunk_tails(dataset: Dataset, parts: list[str]) -> tuple[float, float]:
    """Median seconds, over part files, from the first to the last image answered, and from the
    90th-percentile image to the last: how long a chunk's slowest images hold the worker process
    (which takes its next chunk only when this one ends)."""
    import statistics

    spans, tails = [], []
    for path in parts:
        t = pq.read_table(path, filesystem=dataset.fs, columns=["processed_at"])
        ms = sorted(t["processed_at"].cast(pa.int64()).to_pylist())
        if ms:
            spans.append((ms[-1] - ms[0]) / 1000)
            tails.append((ms[-1] - ms[int(0.9 * (len(ms) - 1))]) / 1000)
    if not spans:
        return 0.0, 0.0
    return statistics.median(spans), statistics.median(tails)


def _several_outcomes(rows: pa.Table) -> int:
    """Images with both a ``failed`` row and an answer (``ok``/``no_plate``) among ``rows``."""
    kinds = pa.table({"image_id": rows["image_id"], "answered": pc.not_equal(rows["status"], "failed")})
    images = len(pc.unique(rows["image_id"]))
    return kinds.group_by(["image_id", "answered"]).aggregate([]).num_rows - images


# --- the pieces ----------------------------------------------------------------------------------
@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    redis_url: str
    server: ServerProcess
    prefix: str = field(default_factory=lambda: f"carnumber-reliab-{uuid.uuid4().hex[:8]}")
    children: list[Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.redis = redis.Redis.from_url(self.redis_url)
        self.runs = RunStore(self.redis, Keys(self.prefix))

    def env(self, secret: str = SECRET) -> dict[str, str]:
        a = self.args
        assert self.server.url
        return {
            "REDIS_URL": self.redis_url,
            "CARNUMBER_ENDPOINT": self.server.url,
            "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": secret,
            "CARNUMBER_OUTPUT": str(self.work / "out"),
            "CARNUMBER_QUEUE": f"{self.prefix}-queue",
            "CARNUMBER_KEY_PREFIX": self.prefix,
            "CARNUMBER_QPS": "0",
            "CARNUMBER_CHUNK_SIZE": str(a.chunk_size),
            "CARNUMBER_CONCURRENCY": str(a.concurrency),
            "CARNUMBER_READ_TIMEOUT_S": str(a.read_timeout_s),
            "CARNUMBER_MAX_ATTEMPTS": str(a.max_attempts),
            "CARNUMBER_RETRY_BASE_S": str(a.retry_base_s),
            "CARNUMBER_RETRY_CAP_S": str(a.retry_cap_s),
        }

    def settings(self, secret: str = SECRET) -> Settings:
        return Settings.from_env(self.env(secret))

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.server.url}/__carnumber/stats", timeout=10).json()

    def reset_stats(self) -> None:
        httpx.post(f"{self.server.url}/__carnumber/reset", timeout=10).raise_for_status()

    def workers(self, secret: str = SECRET) -> Child:
        tag = uuid.uuid4().hex[:6]
        child = start_worker(
            self.env(secret),
            concurrency=self.args.worker_processes,
            hostname=f"reliab{tag}@%h",
            extra=[f"--pool={self.args.pool}"],
        )
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop(timeout_s=60)
        self.children.remove(child)

    def enqueue(self, run_id: str) -> int:
        """Publish every image of the archive for ``run_id``; returns images enqueued."""
        from carnumber.commands.common import configure_celery
        from producers.enqueue import enqueue
        from producers.sources import open_source
        from workers.sink.enqueued import recorder
        from workers.tasks import publish_chunk

        s = self.settings()
        configure_celery(s)
        self.runs.create(run_id, "reliability")
        report = enqueue(
            open_source(str(self.work / "archive"), s),
            run_id,
            runs=self.runs,
            publish=lambda chunk: publish_chunk(chunk, s.queue),
            queue_depth=lambda: int(self.redis.llen(s.queue)),
            chunk_size=s.chunk_size,
            queue_high_water=max(s.queue_high_water, self.args.images // s.chunk_size + 1),
            record=recorder(s.output),  # so `carnumber verify` can check the bench's runs too
        )
        self.runs.touch(run_id)
        return report.images_enqueued

    def expected_ids(self) -> set[str]:
        from producers.sources import open_source

        return {r.image_id for r in open_source(str(self.work / "archive"), self.settings())}

    def summary(self, run_id: str) -> RunSummary:
        s = self.runs.get(run_id)
        if s is None:
            raise RuntimeError(f"run {run_id}: not in Redis")
        return s

    def wait(self, run_id: str, done: Callable[[RunSummary], bool], worker: Child, label: str) -> float:
        """Seconds until ``done(summary)``; raises RuntimeError on a dead worker or the timeout."""
        started = time.monotonic()
        deadline = started + self.args.timeout_s
        last = 0.0
        while True:
            s = self.summary(run_id)
            if done(s):
                return time.monotonic() - started
            if worker.proc.poll() is not None:
                raise RuntimeError(f"{label}: worker exited\n" + "\n".join(worker.lines[-30:]))
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: not finished after {self.args.timeout_s} s: {s}")
            if time.monotonic() - last > 15:
                print(f"  {label}: {s.written}/{s.enqueued} written, {s.parked} parked", flush=True)
                last = time.monotonic()
            time.sleep(0.2)

    def cleanup(self) -> None:
        """Delete this bench's keys (its prefix and its queue) and nothing else."""
        keys = [*self.redis.scan_iter(f"{self.prefix}*", count=1000)]
        if keys:
            self.redis.delete(*keys)
        self.redis.close()


# --- the scenarios -----------------------------------------------------------------------------
Row = tuple[str, str, str]  # measure, value, verdict ("" when the figure is informative only)


def _check(ok: bool) -> str:
    return "ok" if ok else "**FAIL**"


def _codes(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


def fault_run(b: Bench) -> list[Row]:
    a = b.args
    run_id = "faults"
    b.reset_stats()
    worker = b.workers()
    started = time.monotonic()
    enqueued = b.enqueue(run_id)
    b.wait(run_id, lambda s: s.outstanding == 0 and s.written + s.parked >= enqueued, worker, "fault run")
    elapsed = time.monotonic() - started
    b.stop(worker)
    stats = b.stats()
    summary = b.summary(run_id)
    result = audit(str(b.work / "out"), run_id, b.expected_ids(), a.max_attempts)
    calls = int(stats["requests_total"])
    return [
        ("images enqueued", f"{enqueued}", _check(enqueued == a.images)),
        ("wall time (worker start to last part)", f"{elapsed:.1f} s ({a.images / elapsed:.0f} images/s)", ""),
        ("faults injected", _codes(stats["faults"]), ""),
        ("server answers", _codes(stats["answers"]), ""),
        ("images with a result", f"{result.answered}", ""),
        ("images with a terminal error", f"{result.failed} ({_codes(result.failed_by_code)})", ""),
        ("images parked (should be 0: no stop, no quota)", f"{summary.parked}", _check(summary.parked == 0)),
        ("images missing", f"{result.missing}", _check(result.missing == 0 and result.unexpected == 0)),
        ("parts before compaction", f"{result.parts_before} ({result.rows_before} rows)", ""),
        (
            "duplicate (image_id, plate_index) rows before compaction",
            f"{result.duplicates_before}",
            _check(result.duplicates_before == 0),
        ),
        (
            "images with two outcomes before compaction",
            f"{result.images_with_several_outcomes_before}",
            _check(result.images_with_several_outcomes_before == 0),
        ),
        (
            "duplicate rows after compaction",
            f"{result.duplicates_after}",
            _check(result.duplicates_after == 0),
        ),
        (
            "chunk: median span / median wait on its slowest 10 %",
            f"{result.chunk_span_s:.1f} s / {result.chunk_tail_s:.1f} s",
            "",
        ),
        ("calls per image (server requests / images)", f"{calls / a.images:.3f} ({calls} requests)", ""),
        (
            "attempts column: mean / max",
            f"{result.attempts_mean:.3f} / {result.attempts_max}",
            _check(result.over_max_attempts == 0),
        ),
        (
            "sum of attempts = server requests",
            f"{result.attempts_sum} vs {calls}",
            _check(result.attempts_sum == calls),
        ),
        (
            "run counter `calls` = server requests",
            f"{summary.fields.get('calls')} vs {calls}",
            _check(int(summary.fields.get("calls", 0)) == calls),
        ),
    ]


def wrong_secret_run(b: Bench) -> list[Row]:
    a = b.args
    run_id = "wrong-secret"
    b.reset_stats()
    enqueued = b.enqueue(run_id)  # all chunks wait in the queue: both processes start together
    worker = b.workers(WRONG_SECRET)
    b.wait(run_id, lambda s: s.outstanding == 0 and s.parked + s.written >= enqueued, worker, "wrong secret")
    b.stop(worker)
    stats = b.stats()
    stopped = b.summary(run_id)
    rows_while_stopped = open_dataset(str(b.work / "out")).read_run(run_id).num_rows
    processes = a.worker_processes if a.pool == "prefork" else 1  # threads share one engine
    bound = processes * a.concurrency + processes
    calls_stopped = int(stats["requests_total"])
    fleet = _fleet_status(b)

    b.reset_stats()
    worker = b.workers()
    env = {**os.environ, **b.env()}
    resume = subprocess.run(
        [sys.executable, "-m", "carnumber.cli", "resume", run_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    started = time.monotonic()
    resumed_ok = resume.returncode == 0
    if resumed_ok:
        b.wait(run_id, lambda s: s.state == "done" and s.outstanding == 0, worker, "resumed run")
    elapsed = time.monotonic() - started
    b.stop(worker)
    after = b.summary(run_id)
    calls_resumed = int(b.stats()["requests_total"])
    result = audit(str(b.work / "out"), run_id, b.expected_ids(), a.max_attempts)
    resume_lines = " / ".join(line for line in resume.stdout.splitlines() if line.strip())
    return [
        ("images enqueued", f"{enqueued}", _check(enqueued == a.images)),
        (
            "calls that reached the server before the stop",
            f"{calls_stopped} ({_codes(stats['answers'])})",
            _check(1 <= calls_stopped <= bound),
        ),
        (
            "bound: processes x concurrency + processes",
            f"{processes} x {a.concurrency} + {processes} = {bound}",
            "",
        ),
        (
            "run state, stop code",
            f"{stopped.state}, {stopped.fields.get('stop_code')}",
            _check(stopped.state == "stopped" and stopped.fields.get("stop_code") == "SignatureDoesNotMatch"),
        ),
        ("fleet stop flag", f"{fleet}", _check(fleet == "SignatureDoesNotMatch")),
        (
            "images failed / rows written while stopped",
            f"{stopped.fields.get('images_failed', 0)} / {rows_while_stopped}",
            _check(int(stopped.fields.get("images_failed", 0)) == 0 and rows_while_stopped == 0),
        ),
        (
            "images parked = images enqueued",
            f"{stopped.parked} = {stopped.enqueued}",
            _check(stopped.parked == stopped.enqueued == enqueued),
        ),
        ("`carnumber resume`", resume_lines or resume.stderr.strip()[-300:], _check(resumed_ok)),
        (
            "resumed run: state, time to done",
            f"{after.state}, {elapsed:.1f} s",
            _check(after.state == "done"),
        ),
        (
            # Informative: `carnumber resume` leaves the field, so `carnumber status` shows it.
            "resumed run: `stop_code` still on the run",
            f"{after.fields.get('stop_code') or 'none'}",
            "",
        ),
        (
            "resumed run: calls (faults still on)",
            f"{calls_resumed} ({calls_resumed / a.images:.3f} per image)",
            "",
        ),
        (
            "images with a result / terminal error",
            f"{result.answered} / {result.failed} ({_codes(result.failed_by_code)})",
            "",
        ),
        ("images missing", f"{result.missing}", _check(result.missing == 0 and result.unexpected == 0)),
        (
            "duplicate rows before / after compaction",
            f"{result.duplicates_before} / {result.duplicates_after}",
            _check(result.duplicates_before == 0 and result.duplicates_after == 0),
        ),
        (
            "images with two outcomes before compaction",
            f"{result.images_with_several_outcomes_before}",
            _check(result.images_with_several_outcomes_before == 0),
        ),
        (
            "attempts column: mean / max",
            f"{result.attempts_mean:.3f} / {result.attempts_max}",
            _check(result.over_max_attempts == 0),
        ),
    ]


def _fleet_status(b: Bench) -> str | None:
    import asyncio

    import redis.asyncio as aredis

    from workers.fleet import FleetControl
    from workers.keys import account_tag

    async def read() -> dict[str, Any] | None:
        client = aredis.Redis.from_url(b.redis_url)
        try:
            return await FleetControl(client, Keys(b.prefix), account_tag(KEY_ID)).status()
        finally:
            await client.aclose()

    status = asyncio.run(read())
    return status["code"] if status else None


def _table(title: str, rows: list[Row]) -> str:
    lines = [f"### {title}", "", "| measure | value | check |", "| --- | --- | --- |"]
    lines += [f"| {m} | {v.replace('|', '/')} | {c} |" for m, v, c in rows]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--only", choices=("fault", "secret"), help="run one scenario")
    p.add_argument("--pool", choices=("prefork", "threads"), default="prefork",
                   help="the workers' Celery pool (threads: one process, chunks share its slots)")
    p.add_argument("--worker-processes", type=int, default=2,
                   help="pool processes, or pool threads (chunks at once) with --pool threads")
    p.add_argument("--concurrency", type=int, default=32, help="calls in flight per worker process")
    p.add_argument("--chunk-size", type=int, default=200)
    p.add_argument("--read-timeout-s", type=float, default=1.0, help="workers' HTTP read timeout")
    p.add_argument("--hang-s", type=float, default=3.0, help="how long the server holds a hung call")
    p.add_argument("--max-attempts", type=int, default=6, help="calls per image, the first included")
    p.add_argument("--retry-base-s", type=float, default=0.5)
    p.add_argument("--retry-cap-s", type=float, default=30.0)
    p.add_argument("--fault-503", type=float, default=0.10)
    p.add_argument("--fault-throttle", type=float, default=0.05)
    p.add_argument("--fault-hang", type=float, default=0.02)
    p.add_argument("--fault-reset", type=float, default=0.01)
    p.add_argument("--fault-malformed", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=20240607)
    p.add_argument("--timeout-s", type=float, default=1800, help="give up waiting on a run after this")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="carnumber-reliab-"))
    embedded: EmbeddedRedis | None = None
    server: ServerProcess | None = None
    bench: Bench | None = None
    try:
        print(f"generating {args.images} images ...", flush=True)
        write_test_archive(work / "archive", args.images)
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            embedded = EmbeddedRedis()
            redis_url = embedded.url
        faults = [
            "--fault-503",
            str(args.fault_503),
            "--fault-throttle",
            str(args.fault_throttle),
            "--fault-hang",
            str(args.fault_hang),
            "--hang-s",
            str(args.hang_s),
            "--fault-reset",
            str(args.fault_reset),
            "--fault-malformed",
            str(args.fault_malformed),
            "--seed",
            str(args.seed),
        ]
        server = start_server(["--keys", f"{KEY_ID}:{SECRET}", "--qps", "0", *faults])
        bench = Bench(args, work, redis_url, server)
        print(f"server: carnumber serve --qps 0 {' '.join(faults)}", flush=True)
        print(
            f"workers: {args.worker_processes} {'processes' if args.pool == 'prefork' else 'threads'}"
            f" ({args.pool} pool) x {args.concurrency} calls in flight per process, "
            f"read timeout {args.read_timeout_s} s, max_attempts {args.max_attempts}, "
            f"backoff base {args.retry_base_s} s cap {args.retry_cap_s} s",
            flush=True,
        )
        tables = []
        if args.only in (None, "fault"):
            print("fault run ...", flush=True)
            tables.append(("Fault run", fault_run(bench)))
        if args.only in (None, "secret"):
            print("wrong-secret run ...", flush=True)
            tables.append(("Wrong-secret run, then resume", wrong_secret_run(bench)))
        print()
        print(f"{args.images} images; load average {_load()} on {os.cpu_count()} cores")
        for title, rows in tables:
            print()
            print(_table(title, rows))
        failed = [m for _, rows in tables for m, _, c in rows if c not in ("", "ok")]
        print()
        print("all invariants hold" if not failed else f"FAILED: {'; '.join(failed)}")
        return 0 if not failed else 1
    finally:
        if bench is not None:
            for child in reversed(bench.children):
                child.stop()
            bench.cleanup()
        if server is not None:
            server.stop()
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(work, ignore_errors=True)


def _load() -> str:
    """The 1, 5 and 15 minute load averages (the machine is shared)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
