"""``carnumber enqueue SOURCE --run RUN_ID`` — stream a source into the broker for one run."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import datetime

from carnumber.commands.common import configure_celery, connect_redis, run_store, settings_from
from workers.errors import InputError

__all__ = ["add_arguments", "main"]

log = logging.getLogger("carnumber.enqueue")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help="a folder, .tar/.tar.gz/.zip archive, s3://bucket/prefix, oss://bucket/prefix, "
        "or a manifest (.txt, .csv, .jsonl, .parquet)",
    )
    parser.add_argument("--run", required=True, dest="run_id", help="run id, e.g. 2026-11-24")
    parser.add_argument(
        "--glob", help="only file names matching this pattern (folders, archives, buckets)"
    )
    parser.add_argument(
        "--since", type=datetime.fromisoformat, help="only images modified/dated at or after"
    )
    parser.add_argument(
        "--until", type=datetime.fromisoformat, help="only images modified/dated before"
    )
    parser.add_argument(
        "--reprocess",
        action="store_true",
        help="call again for images answered in earlier runs (by id or by content)",
    )
    parser.add_argument("--chunk-size", type=int, help="images per message (CARNUMBER_CHUNK_SIZE)")
    parser.add_argument(
        "--wait", action="store_true", help="then follow the run until it is finished"
    )
    parser.add_argument(
        "--deadline", help="when the run should be done, for carnumber status (ISO time or HH:MM UTC)"
    )


def _paused(runs, run_id: str) -> str | None:  # type: ignore[no-untyped-def]
    summary = runs.get(run_id)
    state = summary.state if summary else None
    return state if state in ("stopped", "quota_exhausted") else None


def main(args: argparse.Namespace) -> int:
    from carnumber.progress import enqueue_progress
    from producers.answer_index import update_answers
    from producers.enqueue import enqueue_to_broker
    from producers.enqueued import recorder
    from producers.ledger import Ledger
    from producers.sources import open_source
    from workers.earlier import REUSE_FIELD, UPDATED_FIELD
    from workers.sink.dataset import check_run_id

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
    if reason := _paused(runs, args.run_id):
        raise InputError(
            f"run {args.run_id} is {reason}: fix the cause, `carnumber resume {args.run_id}`, then enqueue"
        )
    extra = {REUSE_FIELD: "0" if args.reprocess else "1"}
    if args.deadline:
        extra["deadline"] = args.deadline
    # "enqueuing" first: a run no longer "running" is not marked done (nor its journal dropped)
    # by its last chunk, so a further source's copies still find the answers of this run's
    # chunks in flight; those already written are in the cache, brought up to date after this.
    runs.set_state(args.run_id, "enqueuing", **extra)
    ledger = None if args.reprocess else Ledger.open(settings.output, exclude_run=args.run_id)
    if not args.reprocess:
        # Answers of earlier runs by content: the workers answer moved and copied pictures from it.
        cache = update_answers(settings.output)
        log.info(
            "answer cache: %d pictures answered in earlier runs (%d new from %d files)",
            cache.entries,
            cache.answers_added,
            cache.files_ingested,
        )
        runs.set_state(args.run_id, "enqueuing", **{UPDATED_FIELD: time.time()})  # workers: re-read it
    started = time.monotonic()
    progress, on_progress = enqueue_progress(args.run_id)  # a bar on a terminal, else log lines
    report = enqueue_to_broker(
        refs,
        args.run_id,
        settings=settings,
        redis_client=client,
        runs=runs,
        ledger=ledger,
        chunk_prefix=chunk_prefix,
        paused_reason=lambda: _paused(runs, args.run_id),
        record=recorder(settings.output),  # what `carnumber verify` reconciles the output against
        on_progress=on_progress,
    )
    on_progress(report)
    progress.close()
    if report.stopped_by is None:  # a paused run keeps its state (resume sets it running)
        runs.set_state(
            args.run_id, "running", enqueue_finished_at=time.time(), lines_skipped=len(skipped)
        )
    elapsed = time.monotonic() - started
    print(
        f"run {args.run_id}: {report.images_seen} images seen, {report.images_enqueued} enqueued in "
        f"{report.chunks_published} chunks ({report.chunks_already_published} chunks already enqueued, "
        f"{report.images_already_answered} answered in earlier runs, {report.duplicates_dropped} duplicates, "
        f"{len(skipped)} inputs skipped) in {elapsed:.1f}s, waited {report.waited_s:.1f}s for the queue"
    )
    summary = runs.get(args.run_id)
    if summary is not None and summary.outstanding == 0 and summary.parked == 0:
        runs.set_state(args.run_id, "done")
    if args.wait:
        from carnumber.commands.status import follow

        return follow(runs, args.run_id, out=sys.stdout)
    return 0
