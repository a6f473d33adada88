"""Run one chunk end to end: build the async services, process, write the part, do the books.

:class:`Runtime` is built once per worker process (settings, Redis, output dataset, resolver);
:func:`execute_chunk` is what the Celery task calls, and what tests call without Celery.
Order matters for exactly-once rows: write the part (atomic rename) → count it → park what is
pending → return (the task acks). A crash anywhere before the ack redelivers the same message,
which rewrites the same part name and is counted once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx
import redis
import redis.asyncio as aredis

from workers.admission import Gate
from workers.api.client import AsyncClient, http_timeout
from workers.config import Settings
from workers.errors import FleetStopped
from workers.keys import Keys, account_tag
from workers.message import Chunk
from workers.metrics import CallCounter
from workers.pipeline import ChunkContext, ChunkResult, process_chunk
from workers.runs import RunStore
from workers.sink.dataset import Dataset, open_dataset

__all__ = ["Runtime", "execute_chunk"]

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    redis: redis.Redis
    runs: RunStore
    dataset: Dataset
    resolver: object
    on_call: CallCounter | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        from workers.storage import Resolver

        creds = settings.credentials()  # fail fast, naming the variables
        client = redis.Redis.from_url(settings.broker_url)
        keys = Keys(settings.key_prefix)
        return cls(
            settings=settings,
            redis=client,
            runs=RunStore(client, keys),
            dataset=open_dataset(settings.output),
            resolver=Resolver(settings),
            on_call=CallCounter(client, keys, account_tag(creds.access_key_id)),
        )


async def _process(chunk: Chunk, rt: Runtime) -> ChunkResult:
    from workers.fleet import CircuitBreaker, FleetControl
    from workers.ratelimit import from_settings as limits_from_settings
    from workers.retry import RetryPolicy

    s = rt.settings
    creds = s.credentials()
    keys = Keys(s.key_prefix)
    account = account_tag(creds.access_key_id)
    # Short timeouts: an unreachable Redis must pause calls quickly, not hang the chunk.
    ar = aredis.Redis.from_url(
        s.broker_url, socket_timeout=10, socket_connect_timeout=5
    )
    limits = httpx.Limits(max_connections=s.concurrency, max_keepalive_connections=s.concurrency)
    try:
        async with httpx.AsyncClient(timeout=http_timeout(s), limits=limits) as http:
            limiter, quota = limits_from_settings(s, ar)
            fleet = FleetControl(ar, keys, account)
            breaker = CircuitBreaker(ar, keys, account)
            ctx = ChunkContext(
                client=AsyncClient(s.endpoint, creds, http),
                resolver=rt.resolver,  # type: ignore[arg-type]
                gate=Gate(fleet=fleet, breaker=breaker, limiter=limiter, quota=quota),
                policy=RetryPolicy.from_settings(s),
                fleet=fleet,
                breaker=breaker,
                concurrency=s.concurrency,
                on_call=rt.on_call,
            )
            return await process_chunk(chunk, ctx)
    finally:
        await ar.aclose()


def execute_chunk(chunk: Chunk, rt: Runtime) -> ChunkResult:
    """Process ``chunk`` and make its outcome durable. Raises only on infrastructure trouble
    (Redis, output store), which the task retries."""
    result = asyncio.run(_process(chunk, rt))
    if rt.on_call is not None:
        rt.on_call.flush()
    done = len(chunk.images) - len(result.pending)
    if result.rows:
        pending_ids = {r.image_id for r in result.pending}
        written = Chunk(
            chunk.run_id,
            chunk.chunk_id,
            tuple(r for r in chunk.images if r.image_id not in pending_ids),
        )
        rt.dataset.write_part(chunk.run_id, written.part_name, result.rows)
        rt.runs.mark_written(
            chunk.run_id, written.part_name, done, result.failed, result.plates, result.calls
        )
    if result.pending:
        reason = result.pause.state if result.pause is not None else "paused"
        remainder = Chunk(chunk.run_id, chunk.chunk_id, tuple(result.pending))
        rt.runs.park(remainder, reason)
        if isinstance(result.pause, FleetStopped):
            rt.runs.set_state(chunk.run_id, "stopped", stop_code=result.pause.code)
        log.warning(
            "run %s chunk %s: %d image(s) parked (%s)",
            chunk.run_id,
            chunk.chunk_id,
            len(result.pending),
            result.pause,
        )
    else:
        summary = rt.runs.get(chunk.run_id)
        if (
            summary
            and summary.state == "running"
            and summary.outstanding == 0
            and summary.parked == 0
        ):
            rt.runs.set_state(chunk.run_id, "done")
    return result
