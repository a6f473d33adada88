"""``carnumber cancel RUN_ID`` — pause the run for good: no more calls, its queued chunks taken
off the broker (and kept parked, so ``carnumber resume RUN_ID --force`` could still finish it).
Safe to Ctrl-C and to run again: a queued chunk is parked before it is taken off the queue."""

from __future__ import annotations

import argparse

import redis

from carnumber.commands.pause import hold_run
from workers.books.queued import chunk_of, queued_messages
from workers.books.runs import RunStore
from workers.message import Chunk

__all__ = ["add_arguments", "main", "take_queued"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id")


def take_queued(client: redis.Redis, queue: str, runs: RunStore, run_id: str) -> list[Chunk]:
    """Park ``run_id``'s chunk messages, then take them off the broker queue; returns them. A
    message a worker takes meanwhile is parked by that worker too (the run is held), under the
    same key: parked once."""
    taken: list[Chunk] = []
    for raw in list(queued_messages(client, queue)):
        chunk = chunk_of(raw, run_id)
        if chunk is None:
            continue
        runs.park(chunk, "cancelled")
        if client.lrem(queue, 1, raw):
            taken.append(chunk)
    return taken


def main(args: argparse.Namespace) -> int:
    settings, client, runs = hold_run(args, "cancelled")
    chunks = take_queued(client, settings.queue, runs, args.run_id)
    images = sum(len(c.images) for c in chunks)
    print(
        f"run {args.run_id}: cancelled; {len(chunks)} queued chunks ({images} images) taken off the "
        f"queue and parked. `carnumber resume {args.run_id} --force` would continue it."
    )
    return 0
