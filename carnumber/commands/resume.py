"""``carnumber resume RUN_ID`` — continue a run after a pause, a fatal stop, a spent quota or a
cancel (``--force``): lift the operator's hold and the fleet's stop, publish every parked chunk
again, and finish every source whose enqueue stopped early (by running its enqueue again).

What it reads is the operator's control and the facts of the run, never a state another writer
may have overwritten. Safe to Ctrl-C and to run again: a parked chunk is forgotten only once it
is published again (published twice, its images are called once: the run's books and journal),
and an enqueue run again skips what it published. Exits non-zero when something is left.
"""

from __future__ import annotations

import argparse
import sys

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
    parser.add_argument(
        "--no-enqueue",
        action="store_true",
        help="do not run again the enqueues that stopped early (only say what they are)",
    )


def main(args: argparse.Namespace) -> int:
    import asyncio
    import time

    from carnumber.cli import main as carnumber_main
    from workers.books.control import SETTLE_S, set_control
    from workers.credentials import provider_from_settings
    from workers.fleet import FleetControl
    from workers.keys import Keys, account_tag
    from workers.redis_connect import async_client
    from workers.tasks import publish_chunk

    settings = settings_from(args)
    provider_from_settings(settings)  # fail fast, naming the variables
    client = connect_redis(settings)
    runs = run_store(settings, client)
    summary = runs.get(args.run_id)
    if summary is None:
        raise InputError(f"run {args.run_id!r}: not found in Redis (key prefix {settings.key_prefix!r})")
    if summary.control == "cancelled" and not args.force:
        raise InputError(
            f"run {args.run_id!r} was cancelled: `carnumber resume {args.run_id} --force` to continue it"
        )
    configure_celery(settings)

    async def clear() -> dict | None:
        ar = async_client(settings.broker_url, **settings.redis_access())
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
    if summary.control is not None:
        set_control(client, Keys(settings.key_prefix), args.run_id, None)
        time.sleep(SETTLE_S)  # a chunk that saw the flag a moment ago has parked by now
    runs.create(args.run_id, summary.fields.get("source", ""))  # live again: no retention expiry
    images = chunks = 0
    for name, chunk in runs.parked(args.run_id):
        publish_chunk(chunk, settings.queue)
        runs.unpark(args.run_id, name)  # only now: a Ctrl-C in between publishes it once more
        images += len(chunk.images)
        chunks += 1
    print(f"run {args.run_id}: re-published {images} images in {chunks} chunks")

    code = 0
    for enqueue in (runs.get(args.run_id) or summary).unfinished_enqueues:
        argv = enqueue.argv
        if args.no_enqueue or not argv:
            print(
                f"run {args.run_id}: {enqueue.source} was NOT enqueued to its end "
                f"({enqueue.published} images published): run `{enqueue.command}`",
                file=sys.stderr,
            )
            code = max(code, 3)
            continue
        print(f"run {args.run_id}: finishing the enqueue of {enqueue.source}: {enqueue.command}")
        code = max(code, int(carnumber_main(argv[1:]) or 0))
    runs.settle(args.run_id, settings.run_retention_s)
    return code
