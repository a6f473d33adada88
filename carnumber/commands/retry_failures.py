"""``carnumber retry-failures RUN_ID`` — re-enqueue only images whose latest outcome is a
retryable error that exhausted its attempts (bad-input failures are final and stay as they are)."""

from __future__ import annotations

import argparse

from carnumber.commands.common import configure_celery, connect_redis, run_store, settings_from

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id")
    parser.add_argument("--dry-run", action="store_true", help="only count them")


def main(args: argparse.Namespace) -> int:
    from carnumber.progress import enqueue_progress
    from producers.enqueue import enqueue_to_broker
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
    round_no = int(client.hincrby(runs.keys.run(args.run_id), "retry_rounds", 1))
    # "running" before publishing: a worker that finishes the last chunk marks the run done.
    runs.set_state(args.run_id, "running")
    # A retry round is a sub-run: its chunk ids are prefixed so they never collide with the first pass.
    progress, on_progress = enqueue_progress(args.run_id, total=len(refs))
    with progress:
        report = enqueue_to_broker(
            refs,
            args.run_id,
            settings=settings,
            redis_client=client,
            runs=runs,
            chunk_prefix=f"retry{round_no}-",
            on_progress=on_progress,
        )
        on_progress(report)
    print(f"run {args.run_id}: re-enqueued {report.images_enqueued} images (retry round {round_no})")
    return 0
