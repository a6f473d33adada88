"""``carnumber enqueue SOURCE --run RUN_ID`` — stream a source into the broker for one run."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING

from carnumber.commands.common import configure_celery, connect_redis, run_store, settings_from
from workers.errors import InputError

if TYPE_CHECKING:
    from producers.enqueue import EnqueueReport
    from workers.books.runs import RunStore

__all__ = ["HELD", "UNFINISHED", "add_arguments", "command_line", "held", "main"]

log = logging.getLogger("carnumber.enqueue")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help="a folder, .tar/.tar.gz/.zip archive, s3://bucket/prefix, oss://bucket/prefix, "
        "or a manifest (.txt, .csv, .jsonl, .parquet)",
    )
    parser.add_argument("--run", required=True, dest="run_id", help="run id, e.g. 2026-11-24")
    parser.add_argument("--glob", help="only file names matching this pattern (folders, archives, buckets)")
    parser.add_argument("--since", type=datetime.fromisoformat, help="only images modified/dated at or after")
    parser.add_argument("--until", type=datetime.fromisoformat, help="only images modified/dated before")
    parser.add_argument(
        "--reprocess",
        action="store_true",
        help="call again for images answered in earlier runs (by id or by content)",
    )
    parser.add_argument("--chunk-size", type=int, help="images per message (CARNUMBER_CHUNK_SIZE)")
    parser.add_argument("--wait", action="store_true", help="then follow the run until it is finished")
    parser.add_argument(
        "--deadline", help="when the run should be done, for carnumber status (ISO time or HH:MM UTC)"
    )


# Run states in which publishing more would only park it (the operator's hold, a fatal stop, the
# quota spent): the producer stops there and says what is left.
HELD = ("paused", "cancelled", "stopped", "quota_exhausted")
# The exit status of a command that stopped before it had done all it was asked.
UNFINISHED = 3


def held(runs: RunStore, run_id: str) -> str | None:
    summary = runs.get(run_id)
    state = summary.state if summary else None
    return state if state in HELD else None


def command_line(args: argparse.Namespace) -> list[str]:
    """The command that enqueues this source again (it skips what was published)."""
    argv = ["carnumber", "enqueue", args.source, "--run", args.run_id]
    for flag, value in (("--glob", args.glob), ("--since", args.since), ("--until", args.until)):
        if value is not None:
            argv += [flag, value.isoformat() if isinstance(value, datetime) else str(value)]
    if args.reprocess:
        argv.append("--reprocess")
    if args.chunk_size:
        argv += ["--chunk-size", str(args.chunk_size)]
    return argv


def main(args: argparse.Namespace) -> int:
    from carnumber.progress import enqueue_progress
    from producers.answer_index import update_answers
    from producers.enqueue import EnqueueTracker, enqueue_to_broker
    from producers.ledger import Ledger
    from producers.sources import open_source
    from workers.earlier import REUSE_FIELD, UPDATED_FIELD
    from workers.sink.dataset import check_run_id
    from workers.sink.enqueued import recorder

    settings = settings_from(args, chunk_size=args.chunk_size)
    check_run_id(args.run_id)
    client = connect_redis(settings)
    runs = run_store(settings, client)
    configure_celery(settings)

    skipped: list[InputError] = []

    def on_skip(err: InputError) -> None:
        skipped.append(err)
        log.warning("skipped: %s", err)

    refs = open_source(
        args.source, settings, glob=args.glob, since=args.since, until=args.until, on_skip=on_skip
    )
    runs.create(args.run_id, args.source)
    # A further source enqueued into the same run gets chunk ids of its own (a local path by
    # where it really is, so `./night` and `/data/night` are one source).
    where = args.source if "://" in args.source else os.path.realpath(args.source)
    chunk_prefix = runs.source_prefix(args.run_id, where)
    again = shlex.join(command_line(args))
    if reason := held(runs, args.run_id):
        raise InputError(
            f"run {args.run_id} is {reason}: fix the cause, `carnumber resume {args.run_id}` "
            f"(it finishes this enqueue too), or `{again}` after it"
        )
    # This source's enqueue is "running" (with a heartbeat) before anything else: the run is not
    # done (nor its journal dropped) while a further source's copies may still need its answers.
    extra = {REUSE_FIELD: "0" if args.reprocess else "1"}
    if args.deadline:
        extra["deadline"] = args.deadline
    started = time.monotonic()
    with EnqueueTracker(runs, args.run_id, where, command_line(args)) as tracker:
        runs.touch(args.run_id, **extra)
        ledger = None if args.reprocess else Ledger.open(settings.output, exclude_run=args.run_id)
        if not args.reprocess:
            # Answers of earlier runs by content: the workers answer moved and copied pictures.
            cache = update_answers(settings.output)
            log.info(
                "answer cache: %d pictures answered in earlier runs (%d new from %d files)",
                cache.entries,
                cache.answers_added,
                cache.files_ingested,
            )
            runs.touch(args.run_id, **{UPDATED_FIELD: time.time()})  # workers: re-read it
        progress, show_progress = enqueue_progress(args.run_id)  # a bar on a terminal, else log lines

        def on_progress(r: EnqueueReport) -> None:
            tracker.on_progress(r)
            show_progress(r)

        report = enqueue_to_broker(
            refs,
            args.run_id,
            settings=settings,
            redis_client=client,
            runs=runs,
            ledger=ledger,
            chunk_prefix=chunk_prefix,
            paused_reason=lambda: held(runs, args.run_id),
            record=recorder(settings.output),  # what `carnumber verify` reconciles the output against
            on_progress=on_progress,
        )
        on_progress(report)
        progress.close()
    elapsed = time.monotonic() - started
    print(
        f"run {args.run_id}: {report.images_seen} images seen, {report.images_enqueued} enqueued in "
        f"{report.chunks_published} chunks ({report.chunks_already_published} chunks already enqueued, "
        f"{report.images_already_answered} answered in earlier runs, {report.duplicates_dropped} duplicates, "
        f"{len(skipped)} inputs skipped) in {elapsed:.1f}s, waited {report.waited_s:.1f}s for the queue"
    )
    if report.stopped_by is not None:
        print(
            f"carnumber enqueue: NOT FINISHED: run {args.run_id} became {report.stopped_by} after "
            f"{report.images_seen} images of {args.source}; the rest of the source was not enqueued. "
            f"Fix the cause, then `carnumber resume {args.run_id}` finishes it (or `{again}`: it skips "
            "what was published).",
            file=sys.stderr,
        )
        return UNFINISHED
    runs.touch(args.run_id, enqueue_finished_at=time.time(), lines_skipped=len(skipped))
    runs.settle(args.run_id, settings.run_retention_s)  # nothing was left to call: done already
    if args.wait:
        from carnumber.commands.status import follow

        return follow(runs, args.run_id, out=sys.stdout)
    return 0
