"""A run that stalls with images nobody will answer is repaired once, without an operator.

Redis can lose writes under a run: a crash loses its last second (AOF ``everysec``), and a Sentinel
failover promotes a replica that lacks the master's last writes (queued chunk messages, entries of
``unacked``). Those chunks are in no queue and held by no worker, so no lease brings them back:
the run would wait forever with images outstanding. Every node looks, one at a time (a lock), at
the recent runs; a run is *stalled* when it is running (not held, every source enqueued), has images
without an outcome, none of its chunk messages is alive on the broker (``workers/books/queued.py``), and
it stays so for longer than a lease and two sweeps (a dead holder's message is back in the queue by
then). Its images without an outcome are then published again from the producer's records
(``workers/sink/enqueued.py``), under their own chunk ids and positions, **once per chunk**
(``run:{id}:repaired``), counted in the run hash (``images_republished_auto``) and logged. What a
second loss leaves is for ``carnumber verify``. Bound of the extra calls: the answers the lost
writes held (Redis's last second of journal entries), as for any Redis crash.

Chunks without a record (``retry-failures`` rounds) cannot be rebuilt here: ``verify`` reports them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from workers.books.outcomes import OutcomeBook
from workers.books.queued import live_chunks
from workers.books.runs import RunStore
from workers.message import Chunk
from workers.sink.enqueued import EnqueuedRecords

__all__ = ["StalledRuns"]

log = logging.getLogger(__name__)

class StalledRuns:
    """Finds stalled runs and republishes their images without an outcome, once per chunk."""

    def __init__(
        self,
        runs: RunStore,
        outcomes: OutcomeBook,
        records: EnqueuedRecords,
        queue: str,
        publish: Callable[[Chunk], None],
        *,
        stall_s: float,
    ) -> None:
        """``stall_s``: how long a run must look stalled before it is repaired (longer than a
        lease and two sweeps, so a dead holder's chunk is back in the queue by then)."""
        self.runs = runs
        self.outcomes = outcomes
        self.records = records
        self.queue = queue
        self.publish = publish
        self.stall_s = stall_s

    def check_all(self, limit: int = 50) -> int:
        """One round over the most recent runs (after dropping those whose books expired from
        the list of runs); returns the images republished."""
        self.runs.prune()
        return sum(self.check(run_id) for run_id in self.runs.runs(limit=limit))

    def check(self, run_id: str) -> int:
        """Repair ``run_id`` if it is stalled; returns the images republished. Raises
        ``RedisError``, ``OSError`` (the output store)."""
        summary = self.runs.get(run_id)
        key = self.runs.keys.run(run_id)
        if (
            summary is None
            or summary.state != "running"
            or summary.outstanding == 0
            or live_chunks(self.runs.r, self.queue, run_id)
        ):
            if summary is not None and "stalled_since" in summary.fields:
                self.runs.r.hdel(key, "stalled_since")
            return 0
        since = summary.fields.get("stalled_since")
        if since is None:
            self.runs.r.hsetnx(key, "stalled_since", summary.now)
            return 0
        if summary.now - float(since) < self.stall_s:
            return 0
        republished = self._republish(run_id)
        pipe = self.runs.r.pipeline()
        pipe.hdel(key, "stalled_since")
        pipe.hincrby(key, "images_republished_auto", republished)
        pipe.execute()
        log.warning(
            "run %s: stalled with %d image(s) outstanding and no chunk alive on the broker "
            "(lost by Redis?): %d republished once",
            run_id,
            summary.outstanding,
            republished,
        )
        return republished

    def _republish(self, run_id: str) -> int:
        answered = self.outcomes.all_answered(run_id)
        counted = {c.decode() for c in self.runs.r.hkeys(self.runs.keys.run_chunks(run_id))}
        repaired = self.runs.keys.run_repaired(run_id)
        images = 0
        for chunk_id in sorted(counted & set(self.records.files(run_id))):
            chunk = self.records.chunk(run_id, chunk_id)
            if chunk is None:
                continue
            done = answered.get(chunk_id, set())
            missing = chunk.subset(lambda p, _, done=done: p not in done)
            if not missing.images or not self.runs.r.sadd(repaired, chunk_id):
                continue  # complete, or repaired once already: what is left is verify's
            self.publish(missing)
            images += len(missing.images)
        return images

