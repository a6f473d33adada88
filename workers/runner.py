"""Run one chunk end to end: process it on the engine, write the part, do the books.

:class:`Runtime` is built once per worker process (settings, Redis, output dataset, and the
:class:`~workers.engine.Engine` that runs chunks on one long-lived event loop); :func:`execute_chunk`
is what the Celery task calls, from any pool thread, and what tests call without Celery.
Order matters for exactly-once rows: skip the images that have their outcome already → write the
part (atomic rename) → set their bits in the run's books (``workers/books/outcomes.py``) → park what is
pending → return (the task acks). A crash anywhere before the ack redelivers the same message:
images already in the books are not written again, and the others are rebuilt from the journal
without paying for their answers twice. When the run is done its journal is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from workers.books.outcomes import Outcome, OutcomeBook
from workers.books.runs import RunStore
from workers.config import Settings
from workers.credentials import provider_from_settings
from workers.engine import Engine
from workers.errors import FleetStopped, RedisUnavailable, ShuttingDown
from workers.keys import Keys, account_tag
from workers.message import Chunk
from workers.metrics import CallCounter
from workers.pipeline import ChunkResult
from workers.redis_client import resilient_redis
from workers.sink.dataset import Dataset, open_dataset
from workers.storage import Resolver

__all__ = ["Runtime", "execute_chunk"]

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    redis: redis.Redis
    runs: RunStore
    outcomes: OutcomeBook
    keys: Keys
    dataset: Dataset
    engine: Engine
    resolver: Resolver
    # Publishes a chunk to the queue again (a node that shuts down hands back what it has not
    # called); None: such images are parked instead (``carnumber resume``).
    hand_back: Callable[[Chunk], None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        provider_from_settings(settings)  # fail fast, naming the variables
        # Bookkeeping rides out a Redis restart (the chunk's answers wait in memory meanwhile).
        client = resilient_redis(settings.broker_url, settings.redis_outage_s, **settings.redis_access())
        keys = Keys(settings.key_prefix)
        counter = CallCounter(client, keys, account_tag(settings.limit_group()))
        resolver = Resolver(settings)
        return cls(
            settings=settings,
            redis=client,
            runs=RunStore(client, keys),
            outcomes=OutcomeBook(client, keys),
            keys=keys,
            dataset=open_dataset(settings.output),
            engine=Engine(settings, resolver, counter),
            resolver=resolver,
        )

    def close(self) -> None:
        """Stop the engine, then close the resolver's threads and the connections."""
        self.engine.close()
        self.resolver.close()
        self.redis.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def execute_chunk(chunk: Chunk, rt: Runtime) -> ChunkResult:
    """Process ``chunk`` and make its outcome durable. Raises only on infrastructure trouble
    (Redis, output store), which the task retries."""
    run_id = chunk.run_id
    answered = rt.outcomes.answered(run_id, chunk.chunk_id)
    todo = chunk.subset(lambda position, _: position not in answered)
    if not todo.images:
        # Every image has its outcome already: a redelivery whose ack was lost, a remainder that
        # another holder finished, a message published twice. Nothing to call, nothing to write.
        log.info("run %s chunk %s: already answered, skipped", run_id, chunk.chunk_id)
        _finish_if_done(rt, run_id)
        return ChunkResult()
    result = rt.engine.run(todo)
    if isinstance(result.pause, RedisUnavailable):
        # Redis stayed away past CARNUMBER_REDIS_OUTAGE_S: nothing to park it with. The task
        # retries the chunk later; its answers so far wait in the journal.
        raise redis.ConnectionError(str(result.pause))
    if result.superseded:
        log.warning(
            "run %s chunk %s: %d image(s) written by another holder meanwhile",
            run_id,
            chunk.chunk_id,
            len(result.superseded),
        )
    if result.rows and result.superseded:
        # Another holder of the chunk is writing it too (a lease that ran out under a paused
        # node): leave it the images it has written meanwhile.
        done_now = rt.outcomes.answered(run_id, chunk.chunk_id)
        theirs = {r.image_id for p, r in zip(todo.position_of(), todo.images, strict=True) if p in done_now}
        result.rows = [row for row in result.rows if row["image_id"] not in theirs]
    if result.rows:
        have_rows = {row["image_id"] for row in result.rows}
        written = todo.subset(lambda _, ref: ref.image_id in have_rows)
        rt.dataset.write_part(run_id, written.part_name, result.rows)
        # Calls are counted into the run as they are made (the engine's CallCounter), not here:
        # a chunk cut short by a crash has counted what it paid for too.
        rt.outcomes.mark(run_id, chunk.chunk_id, _outcomes(written, result.rows), part=written.part_name)
        if rt.runs.r.exists(rt.keys.run_parked(run_id)):
            rt.runs.drop_answered(run_id, chunk.chunk_id, rt.outcomes.answered(run_id, chunk.chunk_id))
    if result.pending:
        reason = result.pause.state if result.pause is not None else "paused"
        pending_ids = {r.image_id for r in result.pending}
        remainder = todo.subset(lambda _, ref: ref.image_id in pending_ids)
        if isinstance(result.pause, ShuttingDown) and _handed_back(rt, remainder):
            return result
        if isinstance(result.pause, FleetStopped):
            rt.runs.note_stop(run_id, result.pause.code)
        rt.runs.park(remainder, reason)
        log.warning(
            "run %s chunk %s: %d image(s) parked (%s)",
            run_id,
            chunk.chunk_id,
            len(result.pending),
            result.pause,
        )
    else:
        _finish_if_done(rt, run_id)
    return result


def _handed_back(rt: Runtime, remainder: Chunk) -> bool:
    """Publish what a node that shuts down has not called, for another node to take at once
    (not after a lease). False when it cannot (no broker): then it is parked."""
    if rt.hand_back is None:
        return False
    try:
        rt.hand_back(remainder)
    except Exception as exc:  # the broker away as the node stops: parked instead, resume takes it
        log.warning("run %s chunk %s: not handed back (%s)", remainder.run_id, remainder.chunk_id, exc)
        return False
    log.warning(
        "run %s chunk %s: %d image(s) handed back (shutting down)",
        remainder.run_id,
        remainder.chunk_id,
        len(remainder.images),
    )
    return True


def _outcomes(written: Chunk, rows: list[dict[str, Any]]) -> list[Outcome]:
    """Each written image's outcome for the books: failed or not, and its plates."""
    failed: set[str] = set()
    plates: dict[str, int] = {}
    for row in rows:
        if row["status"] == "failed":
            failed.add(row["image_id"])
        elif row["status"] == "ok":
            plates[row["image_id"]] = plates.get(row["image_id"], 0) + 1
    return [
        Outcome(position, ref.image_id in failed, plates.get(ref.image_id, 0))
        for position, ref in zip(written.position_of(), written.images, strict=True)
    ]


def _finish_if_done(rt: Runtime, run_id: str) -> None:
    """When every enqueued image of the run has its outcome (and every source was enqueued to its
    end), drop the run's journal and let its keys expire after the retention."""
    rt.runs.settle(run_id, rt.settings.run_retention_s)
