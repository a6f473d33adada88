"""``carnumber retry-failures RUN_ID`` — re-enqueue only images whose latest outcome is a
retryable error that exhausted its attempts (bad-input failures are final and stay as they are)."""

from __future__ import annotations

import argparse
import sys

from carnumber.commands.common import configure_celery, connect_redis, run_store, settings_from
from workers.errors import InputError

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id")
    parser.add_argument("--dry-run", action="store_true", help="only count them")


def main(args: argparse.Namespace) -> int:
    from carnumber.commands.enqueue import UNFINISHED, held
    from carnumber.progress import enqueue_progress
    from producers.enqueue import EnqueueReport, EnqueueTracker, enqueue_to_broker
    from workers.sink.dataset import open_dataset
    from workers.sink.failures import retryable_failures

    settings = settings_from(args)
    refs = retryable_failures(open_dataset(settings.output), args.run_id)
    if args.dry_run or not refs:
        print(f"run {args.run_id}: {len(refs)} images with a retryable failure")
        return 0
    client = connect_redis(settings)
    runs = run_store(settings, client)
    configure_celery(settings)
    if reason := held(runs, args.run_id):
        raise InputError(f"run {args.run_id} is {reason}: `carnumber resume {args.run_id}` first")
    argv = ["carnumber", "retry-failures", args.run_id]
    summary = runs.get(args.run_id)
    round_no = int(client.hincrby(runs.keys.run(args.run_id), "retry_rounds", 1))
    source = f"retry-failures round {round_no}"
    # This round lists every retryable failure left, those of an earlier round cut short too.
    for earlier in summary.unfinished_enqueues if summary else []:
        if earlier.source.startswith("retry-failures round "):
            done = f"superseded by round {round_no}"
            runs.enqueue_progress(args.run_id, earlier.source, "complete", earlier.published, argv, done)
    # A retry round is a sub-run: its chunk ids are prefixed so they never collide with the first pass.
    progress, show_progress = enqueue_progress(args.run_id, total=len(refs))
    with EnqueueTracker(runs, args.run_id, source, argv) as tracker, progress:

        def on_progress(r: EnqueueReport) -> None:
            tracker.on_progress(r)
            show_progress(r)

        report = enqueue_to_broker(
            refs,
            args.run_id,
            settings=settings,
            redis_client=client,
            runs=runs,
            chunk_prefix=f"retry{round_no}-",
            paused_reason=lambda: held(runs, args.run_id),
            on_progress=on_progress,
        )
        on_progress(report)
    if report.stopped_by is not None:
        print(
            f"carnumber retry-failures: NOT FINISHED: run {args.run_id} became {report.stopped_by} after "
            f"{report.images_enqueued} of {len(refs)} images; `carnumber resume {args.run_id}` finishes it",
            file=sys.stderr,
        )
        return UNFINISHED
    print(f"run {args.run_id}: re-enqueued {report.images_enqueued} images (retry round {round_no})")
    return 0
