"""``carnumber cancel RUN_ID`` — pause the run for good: no more calls, its queued chunks taken
off the broker (and kept parked, so ``carnumber resume RUN_ID --force`` could still finish it)."""

from __future__ import annotations

import argparse
import base64
import json
from typing import Any

import redis

from carnumber.commands.pause import hold_run
from workers.message import Chunk

__all__ = ["add_arguments", "main", "take_queued"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id")


def _chunk_of(raw: bytes, run_id: str) -> Chunk | None:
    """The chunk a kombu message on the Redis list carries, when it belongs to ``run_id``."""
    try:
        message: dict[str, Any] = json.loads(raw)
        if not str(message.get("headers", {}).get("argsrepr", "")).startswith(f"run={run_id} "):
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        chunk = Chunk.from_wire(args[0])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return chunk if chunk.run_id == run_id else None


def take_queued(client: redis.Redis, queue: str, run_id: str, batch: int = 1000) -> list[Chunk]:
    """Remove ``run_id``'s chunk messages from the broker queue; returns their chunks. A message
    a worker takes meanwhile is parked by that worker instead (the run is held)."""
    taken: list[Chunk] = []
    start = 0
    while True:
        raws = client.lrange(queue, start, start + batch - 1)
        if not raws:
            return taken
        kept = 0
        for raw in raws:
            chunk = _chunk_of(raw, run_id)
            if chunk is not None and client.lrem(queue, 1, raw):
                taken.append(chunk)
            else:
                kept += 1
        start += kept


def main(args: argparse.Namespace) -> int:
    settings, client, runs = hold_run(args, "cancelled")
    chunks = take_queued(client, settings.queue, args.run_id)
    for chunk in chunks:
        runs.park(chunk, "cancelled")
    images = sum(len(c.images) for c in chunks)
    print(
        f"run {args.run_id}: cancelled; {len(chunks)} queued chunks ({images} images) taken off the "
        f"queue and parked. `carnumber resume {args.run_id} --force` would continue it."
    )
    return 0
