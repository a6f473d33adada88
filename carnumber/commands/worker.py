"""``carnumber worker`` — a Celery worker, exactly as ``celery -A workers worker`` starts one."""

from __future__ import annotations

import argparse

from carnumber.commands.common import configure_celery, settings_from

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--concurrency", type=int, help="worker processes (default: CPU count)"
    )
    parser.add_argument("-n", "--hostname", help="node name, e.g. worker1@%%h")
    parser.add_argument("-l", "--loglevel", default="INFO")
    parser.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    parser.add_argument("--max-tasks-per-child", type=int, help="recycle a process after N chunks")


def main(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    settings.credentials()  # a clear error now, not a failed chunk later
    configure_celery(settings)
    from workers.celery import app
    from workers.tasks import use_settings

    use_settings(settings)

    argv = [
        "worker",
        f"--loglevel={args.loglevel}",
        f"--pool={args.pool}",
        f"--queues={settings.queue}",
    ]
    if args.concurrency:
        argv.append(f"--concurrency={args.concurrency}")
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    if args.max_tasks_per_child:
        argv.append(f"--max-tasks-per-child={args.max_tasks_per_child}")
    app.worker_main(argv)
    return 0
