"""``carnumber plan SOURCE [--run RUN_ID]`` — the bill before the night, without calling the API.

Lists the source, runs the local image checks (reading what a worker would read), and prints:
images listed, answered in earlier runs, rejected by rule (with examples), duplicates by
content, calls needed, time at the account's pace, quota windows, cost, and whether the quota
left covers it. ``--json`` prints one JSON object instead. Progress goes to stderr: one
rewritten line on a terminal, a plain line every ``--progress-s`` otherwise.

Exit status: 0 when the calls fit the quota left (or no quota is set), 1 when they do not (the
last line says so), 2 for a configuration or input error. Logic: :mod:`producers.plan`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING, TextIO

from carnumber.commands.common import settings_from

if TYPE_CHECKING:
    from producers.plan import PlanReport

__all__ = ["add_arguments", "main", "render"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help="a folder, .tar/.tar.gz/.zip archive, s3://bucket/prefix, oss://bucket/prefix, "
        "or a manifest (.txt, .csv, .jsonl, .parquet)",
    )
    parser.add_argument(
        "--run", dest="run_id", help="the run it is for: its own earlier answers do not count"
    )
    parser.add_argument("--glob", help="only file names matching this pattern")
    parser.add_argument("--since", type=datetime.fromisoformat, help="only images dated at or after")
    parser.add_argument("--until", type=datetime.fromisoformat, help="only images dated before")
    parser.add_argument(
        "--reprocess", action="store_true", help="count images answered in earlier runs as calls"
    )
    parser.add_argument(
        "--listing-only",
        action="store_true",
        help="read no image bytes: rules from listed sizes only, duplicates by ETag+size",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument(
        "--progress-s", type=float, default=10.0, help="seconds between progress lines (no TTY)"
    )


class _Progress:
    """One renderer: a rewritten line on a terminal, plain periodic lines otherwise."""

    def __init__(self, out: TextIO, every_s: float) -> None:
        self.out = out
        self.tty = out.isatty()
        self.every_s = 0.5 if self.tty else every_s
        self._next = time.monotonic() + self.every_s

    def __call__(self, r: PlanReport) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every_s
        rate = r.listed / r.scan_s if r.scan_s else 0.0
        text = (
            f"plan: {r.listed} listed, {r.answered_earlier} answered earlier, {r.rejected} "
            f"rejected, {r.duplicates} duplicates, {r.calls} calls ({rate:,.0f} images/s)"
        )
        if self.tty:
            self.out.write("\r\x1b[K" + text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def done(self) -> None:
        if self.tty:
            self.out.write("\r\x1b[K")
            self.out.flush()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "no rate limit (CARNUMBER_QPS=0)"
    if seconds < 60:
        return f"{seconds:.1f} s"
    h, rem = divmod(round(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min {s:02d} s" if h else f"{m} min {s:02d} s"


def render(r: PlanReport) -> str:
    """The human-readable bill."""

    def row(label: str, value: object, note: str = "") -> str:
        text = f"{value:,}" if isinstance(value, int) else str(value)
        return f"  {label:<30}{text:>14}" + (f"   {note}" if note else "")

    lines = [
        f"plan for {r.source}" + (f" (run {r.run_id})" if r.run_id else ""),
        row("images listed", r.listed),
        row(
            "answered in earlier runs",
            r.answered_earlier,
            f"{r.answered_earlier_by_content:,} of them moved or copied (by content)"
            if r.answered_earlier_by_content
            else "",
        ),
        row("rejected by the local checks", r.rejected),
    ]
    for rule, n in r.rejected_by_rule.items():
        lines.append(row(f"  {rule}", n, "e.g. " + ", ".join(r.examples.get(rule, []))))
    by = ", ".join(f"{k} {n:,}" for k, n in r.duplicates_by_key.items())
    pace = f"{r.calls_per_s:.2f} calls/s with the pacing guard" if r.calls_per_s else ""
    lines += [
        row("duplicates by content", r.duplicates, f"({by})" if by else ""),
        row("calls needed", r.calls),
        row(f"time at {r.qps:g} QPS", _duration(r.call_time_s), pace),
    ]
    q = r.quota
    if q is not None and q.limit is not None:
        left = "unknown" if q.left is None else f"{q.left:,}"
        note = (f"resets {q.resets_at}" if q.resets_at else "") + (f" ({q.error})" if q.error else "")
        lines.append(row(f"quota left ({q.limit:,} per {q.window})", left, note.strip()))
    if r.quota_windows is not None:
        lines.append(row("quota windows (UTC days)", r.quota_windows))
    if r.cost is not None:
        lines.append(row(f"cost at {r.price_per_1000_calls:g} per 1000 calls", f"{r.cost:,.2f}"))
    lines.append(f"  read {r.bytes_read:,} bytes in {r.scan_s:.1f} s")
    lines.append(r.verdict)
    return "\n".join(lines)


def main(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from producers.answer_index import update_answers
    from producers.ledger import Ledger
    from producers.plan import bill, make_plan, plan_items, quota_view
    from workers.answer_cache import AnswerCache
    from workers.errors import InputError
    from workers.sink.dataset import open_dataset

    out = out or sys.stdout
    err = err or sys.stderr
    settings = settings_from(args)
    skipped: list[InputError] = []
    items = plan_items(
        args.source,
        settings,
        glob=args.glob,
        since=args.since,
        until=args.until,
        on_skip=skipped.append,
    )
    ledger = None if args.reprocess else Ledger.open(settings.output, exclude_run=args.run_id)
    answers = None
    if not args.reprocess:
        update_answers(settings.output)
        answers = AnswerCache.beside(open_dataset(settings.output))
    progress = _Progress(err, args.progress_s)
    try:
        report = make_plan(
            items,
            settings,
            source=args.source,
            run_id=args.run_id,
            ledger=ledger,
            answers=answers,
            listing_only=args.listing_only,
            on_progress=progress,
        )
    finally:
        progress.done()
        if ledger is not None:
            ledger.close()
        if answers is not None:
            answers.close()
    quota = quota_view(settings)
    bill(report, settings, quota)
    if args.json:
        doc = report.to_json()
        doc["manifest_lines_skipped"] = len(skipped)
        out.write(json.dumps(doc) + "\n")
    else:
        if skipped:
            err.write(f"plan: {len(skipped)} manifest line(s) skipped (not images)\n")
        out.write(render(report) + "\n")
    return 0 if report.fits else 1
