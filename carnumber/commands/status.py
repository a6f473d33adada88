"""``carnumber status [RUN_ID]`` — a run's progress and state (or the latest runs)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

from carnumber.commands.common import connect_redis, run_store, settings_from
from workers.errors import InputError
from workers.runs import RunStore

__all__ = ["add_arguments", "follow", "main"]

FINAL_STATES = ("done", "stopped", "quota_exhausted", "circuit_open", "paused")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", nargs="?", help="run to show; omitted: list recent runs")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--follow", action="store_true", help="refresh until the run finishes or pauses"
    )


def line(runs: RunStore, run_id: str) -> str:
    s = runs.get(run_id)
    if s is None:
        return f"{run_id}: unknown run"
    f = s.fields
    pct = 100.0 * s.written / s.enqueued if s.enqueued else 0.0
    extra = f" stop={f['stop_code']}" if f.get("stop_code") else ""
    return (
        f"{run_id}: {s.state}{extra} {s.written}/{s.enqueued} images ({pct:.1f}%), "
        f"failed={f.get('images_failed', 0)} plates={f.get('plates', 0)} calls={f.get('calls', 0)} "
        f"parked={s.parked} in-flight/queued={s.outstanding}"
    )


def follow(
    runs: RunStore,
    run_id: str,
    out: TextIO,
    interval_s: float = 2.0,
    timeout_s: float | None = None,
) -> int:
    """Print progress until the run is done (0) or paused/stopped (3)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        s = runs.get(run_id)
        print(line(runs, run_id), file=out, flush=True)
        if s is not None and s.state in FINAL_STATES and (s.state != "done" or s.outstanding == 0):
            return 0 if s.state == "done" else 3
        if deadline is not None and time.monotonic() > deadline:
            return 4
        time.sleep(interval_s)


def main(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    runs = run_store(settings, connect_redis(settings))
    if not args.run_id:
        for run_id in runs.runs():
            print(line(runs, run_id))
        return 0
    summary = runs.get(args.run_id)
    if summary is None:
        raise InputError(
            f"run {args.run_id!r}: not found in Redis (key prefix {settings.key_prefix!r})"
        )
    if args.follow:
        return follow(runs, args.run_id, out=sys.stdout)
    if args.json:
        print(
            json.dumps({"run_id": args.run_id, "state": summary.state, **summary.fields}, indent=2)
        )
    else:
        print(line(runs, args.run_id))
    return 0
