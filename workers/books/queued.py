"""The chunk messages of a run that are alive on the broker: queued, or held by a worker.

Kombu's Redis transport keeps a queue as a list of JSON messages, and every message a worker has
taken but not acknowledged in the ``unacked`` hash (delivery tag → ``[message, exchange, routing
key]``). A chunk found in either will still run (a dead holder's lease runs out and it is queued
again: ``workers/node/leases.py``), so ``verify --republish`` and ``cancel`` must count it as alive,
never as lost. Reads only; this module imports nothing of ours but :mod:`workers.message`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import redis

from workers.message import Chunk

__all__ = ["chunk_of", "live_chunks", "queued_messages"]


def chunk_of(raw: bytes | str, run_id: str) -> Chunk | None:
    """The chunk a kombu message carries, when it belongs to ``run_id``."""
    try:
        message: dict[str, Any] = json.loads(raw)
        if not str(message.get("headers", {}).get("argsrepr", "")).startswith(f"run={run_id} "):
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        chunk = Chunk.from_wire(json.loads(body)[0][0])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return chunk if chunk.run_id == run_id else None


def queued_messages(client: redis.Redis, queue: str, page: int = 1000) -> Iterator[bytes]:
    """The raw messages on ``queue``, a page at a time (a snapshot: workers take them meanwhile)."""
    start = 0
    while raws := client.lrange(queue, start, start + page - 1):
        yield from raws
        start += len(raws)


def live_chunks(
    client: redis.Redis, queue: str, run_id: str, unacked_key: str = "unacked"
) -> list[Chunk]:
    """Every chunk of ``run_id`` on ``queue`` or held unacknowledged by a worker."""
    found = [c for raw in queued_messages(client, queue) if (c := chunk_of(raw, run_id)) is not None]
    for _, raw in client.hscan_iter(unacked_key, count=500):
        try:
            message = json.loads(raw)[0]
        except (ValueError, IndexError, TypeError):
            continue
        chunk = chunk_of(json.dumps(message) if not isinstance(message, str) else message, run_id)
        if chunk is not None:
            found.append(chunk)
    return found
