"""``carnumber pause RUN_ID`` — stop one run's calls on every host; ``resume`` continues it.

Calls already in flight finish; nothing more is sent for the run once this command returns
(every worker reads the run's flag at most ``cache_s`` late); the run's unanswered images are
parked. Other runs on the same account go on.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from carnumber.commands.common import connect_redis, run_store, settings_from
from workers.errors import InputError

if TYPE_CHECKING:
    import redis

    from workers.books.runs import RunStore
    from workers.config import Settings

__all__ = ["add_arguments", "hold_run", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id")


def hold_run(args: argparse.Namespace, control: str) -> tuple[Settings, redis.Redis, RunStore]:
    """Set ``control`` on the run and wait until every worker has seen it; returns (settings,
    redis client, run store)."""
    from workers.books.control import SETTLE_S, set_control
    from workers.keys import Keys

    settings = settings_from(args)
    client = connect_redis(settings)
    runs = run_store(settings, client)
    summary = runs.get(args.run_id)
    if summary is None:
        raise InputError(f"run {args.run_id!r}: not found in Redis (key prefix {settings.key_prefix!r})")
    if summary.state == "done":
        raise InputError(f"run {args.run_id!r} is done already: nothing left to hold")
    set_control(client, Keys(settings.key_prefix), args.run_id, control)
    runs.touch(args.run_id)
    time.sleep(SETTLE_S)  # every worker's cached read of the flag has expired by now
    return settings, client, runs


def main(args: argparse.Namespace) -> int:
    hold_run(args, "paused")
    print(
        f"run {args.run_id}: paused; calls in flight finish, its unanswered images are parked. "
        f"Continue with: carnumber resume {args.run_id}"
    )
    return 0
