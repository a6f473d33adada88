"""``carnumber resume RUN_ID`` — after a stop, a spent quota or a pause: clear the stop or the
run's pause, re-publish parked images. A cancelled run needs ``--force``."""

from __future__ import annotations

import argparse

from carnumber.commands.common import configure_celery, connect_redis, run_store, settings_from
from workers.errors import InputError

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id")
    parser.add_argument(
        "--keep-stop",
        action="store_true",
        help="do not clear the fleet's stop flag (only re-publish)",
    )
    parser.add_argument("--force", action="store_true", help="resume a cancelled run too")


def main(args: argparse.Namespace) -> int:
    import asyncio
    import time

    import redis.asyncio as aredis

    from workers.fleet import FleetControl
    from workers.keys import Keys, account_tag
    from workers.runswitch import SETTLE_S, set_control
    from workers.tasks import publish_chunk

    settings = settings_from(args)
    settings.credentials()  # fail fast, naming the variables
    client = connect_redis(settings)
    runs = run_store(settings, client)
    summary = runs.get(args.run_id)
    if summary is None:
        raise InputError(f"run {args.run_id!r}: not found in Redis (key prefix {settings.key_prefix!r})")
    if summary.state == "cancelled" and not args.force:
        raise InputError(
            f"run {args.run_id!r} was cancelled: `carnumber resume {args.run_id} --force` to continue it"
        )
    configure_celery(settings)

    async def clear() -> dict | None:
        ar = aredis.Redis.from_url(settings.broker_url)
        try:
            fleet = FleetControl(ar, Keys(settings.key_prefix), account_tag(settings.limit_group()))
            status = await fleet.status()
            await fleet.clear()
            return status
        finally:
            await ar.aclose()

    if not args.keep_stop:
        cleared = asyncio.run(clear())
        if cleared:
            print(f"cleared fleet stop ({cleared.get('code')}: {cleared.get('message')})")
        runs.clear_stop(args.run_id)
    if summary.state in ("paused", "cancelled"):
        set_control(client, Keys(settings.key_prefix), args.run_id, None)
        time.sleep(SETTLE_S)  # a chunk that saw the flag a moment ago has parked by now
    # "running" before publishing: a worker that finishes the last chunk marks the run done.
    runs.set_state(args.run_id, "running")
    chunks = runs.unpark(args.run_id)
    for chunk in chunks:
        publish_chunk(chunk, settings.queue)
    summary = runs.get(args.run_id)
    if summary is not None and summary.outstanding == 0 and summary.parked == 0:
        runs.set_state(args.run_id, "done")
    print(
        f"run {args.run_id}: re-published {sum(len(c.images) for c in chunks)} images in {len(chunks)} chunks"
    )
    return 0
