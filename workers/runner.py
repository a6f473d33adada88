"""Run one chunk end to end: process it on the engine, write the part, do the books.

:class:`Runtime` is built once per worker process (settings, Redis, output dataset, and the
:class:`~workers.engine.Engine` that runs chunks on one long-lived event loop); :func:`execute_chunk`
is what the Celery task calls, from any pool thread, and what tests call without Celery.
Order matters for exactly-once rows: write the part (atomic rename) → count it → park what is
pending → return (the task acks). A crash anywhere before the ack redelivers the same message: a
part already counted is not written again, and one not yet written is rebuilt from the journal
without paying for its answers twice. When the run is done its journal is dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from workers.config import Settings
from workers.engine import Engine
from workers.errors import ChunkSuperseded, FleetStopped, RedisUnavailable
from workers.journal import drop_run
from workers.keys import Keys, account_tag
from workers.message import Chunk
from workers.metrics import CallCounter
from workers.pipeline import ChunkResult
from workers.redis_client import resilient_redis
from workers.runs import RunStore
from workers.sink.dataset import Dataset, open_dataset
from workers.storage import Resolver

__all__ = ["Runtime", "execute_chunk"]

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    redis: redis.Redis
    runs: RunStore
    keys: Keys
    dataset: Dataset
    engine: Engine
    resolver: Resolver

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        settings.credentials()  # fail fast, naming the variables
        # Bookkeeping rides out a Redis restart (the chunk's answers wait in memory meanwhile).
        client = resilient_redis(settings.broker_url, settings.redis_outage_s)
        keys = Keys(settings.key_prefix)
        counter = CallCounter(client, keys, account_tag(settings.limit_group()))
        resolver = Resolver(settings)
        return cls(
            settings=settings,
            redis=client,
            runs=RunStore(client, keys),
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
    if rt.runs.is_written(chunk.run_id, chunk.part_name):
        # A redelivery of a chunk whose part is already written and counted (its ack was lost:
        # a worker died right after, or Redis restarted): nothing to call, nothing to write.
        log.info("run %s chunk %s: already written, skipped", chunk.run_id, chunk.chunk_id)
        _mark_done_if_finished(rt, chunk.run_id)
        return ChunkResult()
    result = rt.engine.run(chunk)
    if isinstance(result.pause, RedisUnavailable):
        # Redis stayed away past CARNUMBER_REDIS_OUTAGE_S: nothing to park it with. The task
        # retries the chunk later; its answers so far wait in the journal.
        raise redis.ConnectionError(str(result.pause))
    if isinstance(result.pause, ChunkSuperseded) or rt.runs.is_written(chunk.run_id, chunk.part_name):
        # Our lease ran out while we worked (a pause, a partition) and another holder wrote the
        # whole part meanwhile: it is complete, ours adds nothing.
        log.warning("run %s chunk %s: written by another holder meanwhile", chunk.run_id, chunk.chunk_id)
        return ChunkResult(calls=result.calls)
    done = len(chunk.images) - len(result.pending)
    if result.rows:
        pending_ids = {r.image_id for r in result.pending}
        written = Chunk(
            chunk.run_id,
            chunk.chunk_id,
            tuple(r for r in chunk.images if r.image_id not in pending_ids),
        )
        rt.dataset.write_part(chunk.run_id, written.part_name, result.rows)
        # Calls are counted into the run as they are made (the engine's CallCounter), not here:
        # a chunk cut short by a crash has counted what it paid for too.
        rt.runs.mark_written(chunk.run_id, written.part_name, done, result.failed, result.plates, 0)
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
        _mark_done_if_finished(rt, chunk.run_id)
    return result


def _mark_done_if_finished(rt: Runtime, run_id: str) -> None:
    summary = rt.runs.get(run_id)
    if summary and summary.state == "running" and summary.outstanding == 0 and summary.parked == 0:
        rt.runs.set_state(run_id, "done")
        drop_run(rt.redis, rt.keys, run_id)  # every answer is in the output now
