"""``carnumber worker`` — a Celery worker, exactly as ``celery -A workers worker`` starts one."""

from __future__ import annotations

import argparse

from carnumber.commands.common import configure_celery, settings_from

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--concurrency",
        type=int,
        help="chunks run at once: pool threads of one process (threads; default 2) or pool "
        "processes (prefork; default: CPU count)",
    )
    parser.add_argument("-n", "--hostname", help="node name, e.g. worker1@%%h")
    parser.add_argument("-l", "--loglevel", default="INFO")
    parser.add_argument(
        "--pool",
        default="threads",
        choices=["prefork", "solo", "threads"],
        help="threads (default): the chunks of one process share its CARNUMBER_CONCURRENCY call "
        "slots, so the next chunk's calls go out while the last ones of the previous chunk are in "
        "flight (full rate at a slow API); a crashed process is a dead node, whose chunks the "
        "other nodes take over when its lease runs out. prefork: one chunk at a time per process, "
        "a crashed pool process is replaced and its chunk requeued at once; more cores for heavy "
        "local work (see ops/README.md)",
    )
    parser.add_argument("--max-tasks-per-child", type=int, help="recycle a process after N chunks")


def main(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    from workers.credentials import provider_from_settings

    provider_from_settings(settings)  # a clear error now, not a failed chunk later
    settings.limit_group()  # rotating credentials need CARNUMBER_ACCOUNT
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
    concurrency = args.concurrency or (2 if args.pool == "threads" else None)
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    if args.max_tasks_per_child:
        argv.append(f"--max-tasks-per-child={args.max_tasks_per_child}")
    # Celery's own exit code: non-zero after an unrecoverable error or a broker that stayed away.
    # app.worker_main() drops it (click returns it in non-standalone mode, and app.start() does
    # not pass it on), and a dead node looked like a clean exit to its supervisor.
    from celery.bin.celery import celery as celery_command

    celery_command.params[0].default = app
    try:
        return int(celery_command.main(args=argv, standalone_mode=False) or 0)
    finally:
        celery_command.params[0].default = None
