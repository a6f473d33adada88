"""``carnumber report RUN_ID`` — the morning summary of a run: images by outcome, failures by code
(retryable or final, with a hint), plates by type, calls and calls per image, throttled answers,
achieved calls per second against the limit, duration and cost. ``--json`` prints one object;
``--failures FILE.csv`` writes the failed images (image_id, source, code, message, retryable).
Reads the output Parquet and, when it is still there, the run's hash in Redis."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from carnumber.commands.common import settings_from

if TYPE_CHECKING:
    import redis

    from carnumber.report import RunReport
    from workers.config import Settings

__all__ = ["add_arguments", "main", "text"]

_MINUTE_TTL_S = 24 * 3600  # workers.metrics.CallCounter's default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.add_argument("--failures", metavar="FILE.csv", help="write the failed images to this CSV file")


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:5.1f}%" if total else "  -  "


def text(r: RunReport) -> str:
    """The report as the plain lines ``carnumber report`` prints."""
    from carnumber.statusview import duration, when

    total = r.images
    of = f" of {r.enqueued} enqueued" if r.enqueued is not None else ""
    parked = f", {r.parked} parked" if r.parked else ""
    lines = [
        f"carnumber report {r.run_id} ({r.state}; source {r.source or '-'})",
        f"  images     {total} with an outcome{of}{parked}",
    ]
    for status, label in (("ok", "plate(s)"), ("no_plate", "no plate"), ("failed", "failed")):
        n = r.by_outcome.get(status, 0)
        lines.append(f"    {label:<10} {n:>8}  {_pct(n, total)}")
    if r.failures:
        lines.append("  failures by code")
        width = max(len(f.code) for f in r.failures)
        for f in r.failures:
            kind = "retryable" if f.retryable else "final    "
            lines.append(f"    {f.code:<{width}} {f.images:>7}  {kind}  {f.hint}".rstrip())
    types = ", ".join(f"{t} {n}" for t, n in r.plates_by_type.items()) or "-"
    lines.append(f"  plates     {r.plates}: {types}")
    per = f"{r.calls_per_image:.2f}" if r.calls_per_image is not None else "-"
    throttled = (
        "- (not counted: no span, or older than the counters' day)" if r.throttled is None else r.throttled
    )
    lines.append(f"  calls      {r.calls} ({per} per image); throttled answers: {throttled}")
    if r.calls_per_s is not None:
        limit = "no limit" if r.qps_limit <= 0 else f"the limit {r.qps_limit:g}"
        share = f" ({100.0 * r.calls_per_s / r.qps_limit:.0f}%)" if r.qps_limit > 0 else ""
        lines.append(f"  rate       {r.calls_per_s:.2f} calls/s achieved against {limit}{share}")
    lines.append(f"  duration   {duration(r.duration_s)} ({when(r.started_at_s)} to {when(r.finished_at_s)})")
    if r.copies_in_run or r.answered_earlier:
        lines.append(
            f"  no call    {r.copies_in_run + r.answered_earlier:,} images: {r.copies_in_run:,} copies of "
            f"a picture called in the run, {r.answered_earlier:,} answered by an earlier run"
        )
    if r.cost is not None:
        lines.append(f"  cost       {r.cost:,.2f} ({r.price_per_1000_calls:g} per 1000 calls)")
    else:
        lines.append("  cost       - (set CARNUMBER_PRICE_PER_1000_CALLS)")
    return "\n".join(lines)


def _throttled_counter(settings: Settings, client: redis.Redis) -> Callable[[float, float], int | None]:
    """Throttled answers of every account between two times, from the per-minute counters."""
    from carnumber.monitor import Monitor
    from workers.keys import Keys
    from workers.metrics import read_call_stats
    from workers.redis_connect import async_client

    keys = Keys(settings.key_prefix)
    url, access = settings.broker_url, settings.redis_access()
    accounts = Monitor(settings, client, lambda: async_client(url, **access)).accounts()

    def count(start_s: float, end_s: float) -> int | None:
        if time.time() - start_s > _MINUTE_TTL_S:
            return None  # those minutes have expired
        minutes = math.ceil((end_s - start_s) / 60) + 1
        total = 0
        for account in accounts:
            stats = read_call_stats(client, keys, account, last_minutes=minutes, now_s=end_s)
            total += sum(n for c, n in stats.by_code.items() if c.lower().startswith("throttling"))
        return total

    return count


def main(args: argparse.Namespace) -> int:
    import redis

    from carnumber.report import build_report, write_failures
    from workers.books.runs import RunStore
    from workers.errors import InputError
    from workers.keys import Keys
    from workers.redis_connect import sync_client
    from workers.sink.dataset import check_run_id, open_dataset

    settings = settings_from(args)
    check_run_id(args.run_id)
    dataset = open_dataset(settings.output)
    fields: dict[str, str] = {}
    throttled = None
    opts = {**settings.redis_access(), "socket_connect_timeout": 3, "socket_timeout": 5}
    client = sync_client(settings.broker_url, **opts)
    try:
        summary = RunStore(client, Keys(settings.key_prefix)).get(args.run_id)
        # The run hash, with the state and the parked images the run's books derive.
        fields: dict[str, str] = {}
        if summary is not None:
            fields = {**summary.fields, "state": summary.state, "images_parked": str(summary.parked)}
        throttled = _throttled_counter(settings, client)
    except (redis.RedisError, OSError) as exc:
        print(f"carnumber report: Redis not readable ({type(exc).__name__}); Parquet only", file=sys.stderr)
    try:
        report = build_report(
            dataset,
            args.run_id,
            fields,
            qps_limit=settings.qps,
            price_per_1000_calls=settings.price_per_1000_calls,
            throttled_between=throttled,
        )
    except (redis.RedisError, OSError) as exc:
        raise InputError(f"run {args.run_id}: cannot read its output or counters ({exc})") from None
    finally:
        client.close()
    if not fields and report.images == 0:
        raise InputError(f"run {args.run_id!r}: not in Redis and no output in {dataset.run_dir(args.run_id)}")
    if args.failures:
        with open(args.failures, "w", newline="", encoding="utf-8") as fh:
            n = write_failures(dataset, args.run_id, fh)
        print(f"wrote {n} failed images to {args.failures}", file=sys.stderr)
    print(json.dumps(report.to_json(), indent=2, ensure_ascii=False) if args.json else text(report))
    return 0
