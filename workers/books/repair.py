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

A failover can also roll back the *count* of chunks the producer published (their ``run:chunks``
entries and their messages alike), and the run then looks done without them. So each run is also
compared once, when it looks done, and every round while it runs, with the producer's records
(on the output store, which no failover rolls back): a recorded chunk Redis does not count is
counted again (under a marker the producer's re-run skips) and published.

Chunks without a record (``retry-failures`` rounds) cannot be rebuilt here: ``verify`` reports them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from workers.books.outcomes import Outcome, OutcomeBook
from workers.books.queued import live_chunks
from workers.books.runs import REPAIRED, RunStore, RunSummary
from workers.message import Chunk
from workers.sink.dataset import Dataset
from workers.sink.enqueued import EnqueuedRecords
from workers.sink.schema import STATUS_FAILED

__all__ = ["StalledRuns"]

log = logging.getLogger(__name__)

class StalledRuns:
    """Finds stalled runs and republishes their images without an outcome, once per chunk."""

    def __init__(
        self,
        runs: RunStore,
        outcomes: OutcomeBook,
        records: EnqueuedRecords,
        dataset: Dataset,
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
        self.dataset = dataset
        self.queue = queue
        self.publish = publish
        self.stall_s = stall_s

    def check_all(self, limit: int = 50) -> int:
        """One round over the most recent runs (after dropping those whose books expired from
        the list of runs); returns the images republished."""
        self.runs.prune()
        return sum(self.check(run_id) for run_id in self.runs.runs(limit=limit))

    def check(self, run_id: str) -> int:
        """Repair ``run_id`` if Redis lost part of it; returns the images republished. Raises
        ``RedisError``, ``OSError`` (the output store)."""
        summary = self.runs.get(run_id)
        if summary is None or summary.state not in ("running", "done", "incomplete"):
            return 0  # held, being enqueued (records lead the counts then), or gone
        republished = 0
        if summary.state == "running" or not summary.fields.get("records_checked"):
            republished += self._uncounted(run_id, summary.state != "running")
        if summary.state == "running":
            republished += self._stalled(summary)
        return republished

    def _uncounted(self, run_id: str, once: bool) -> int:
        """Chunks the producer recorded and published that Redis does not count (their count,
        their message and their outcomes were lost with the last writes before a failover):
        counted again, under a marker the producer's re-run skips, and published."""
        counted = {c.decode() for c in self.runs.r.hkeys(self.runs.keys.run_chunks(run_id))}
        lost = sorted(set(self.records.files(run_id)) - counted)
        written = _written(self.dataset, run_id) if lost else {}
        images = 0
        for chunk_id in lost:
            chunk = self.records.chunk(run_id, chunk_id)
            if chunk is None or not self.runs.r.sadd(self.runs.keys.run_repaired(run_id), chunk_id):
                continue
            if chunk.images:
                self.runs.mark_enqueued(run_id, chunk_id, f"{REPAIRED}{len(chunk.images)}", len(chunk.images))
                images += self._publish_unwritten(chunk, written)
        if images:
            self._note(run_id, images, "chunks recorded by the producer but not counted in Redis")
        if once:
            self.runs.r.hset(self.runs.keys.run(run_id), "records_checked", 1)
        return images

    def _stalled(self, summary: RunSummary) -> int:
        """Images of counted chunks without an outcome, when no chunk of the run is alive."""
        run_id, key = summary.run_id, self.runs.keys.run(summary.run_id)
        if summary.outstanding == 0 or live_chunks(self.runs.r, self.queue, run_id):
            if "stalled_since" in summary.fields:
                self.runs.r.hdel(key, "stalled_since")
            return 0
        since = summary.fields.get("stalled_since")
        if since is None:
            self.runs.r.hsetnx(key, "stalled_since", summary.now)
            return 0
        if summary.now - float(since) < self.stall_s:
            return 0
        self.runs.r.hdel(key, "stalled_since")
        images = self._republish(run_id)
        why = f"stalled with {summary.outstanding} image(s) outstanding and no chunk alive"
        self._note(run_id, images, why)
        return images

    def _note(self, run_id: str, images: int, why: str) -> None:
        self.runs.r.hincrby(self.runs.keys.run(run_id), "images_republished_auto", images)
        log.warning("run %s: %s (lost by Redis?): %d image(s) republished once", run_id, why, images)

    def _republish(self, run_id: str) -> int:
        answered = self.outcomes.all_answered(run_id)
        counted = {c.decode() for c in self.runs.r.hkeys(self.runs.keys.run_chunks(run_id))}
        repaired = self.runs.keys.run_repaired(run_id)
        written: dict[str, Outcome] | None = None
        images = 0
        for chunk_id in sorted(counted & set(self.records.files(run_id))):
            chunk = self.records.chunk(run_id, chunk_id)
            if chunk is None:
                continue
            done = answered.get(chunk_id, set())
            missing = chunk.subset(lambda p, _, done=done: p not in done)
            if not missing.images or not self.runs.r.sadd(repaired, chunk_id):
                continue  # complete, or repaired once already: what is left is verify's
            written = _written(self.dataset, run_id) if written is None else written
            images += self._publish_unwritten(missing, written)
        return images

    def _publish_unwritten(self, chunk: Chunk, written: dict[str, Outcome]) -> int:
        """Count the images of ``chunk`` whose rows are in the output already (their bits were
        lost, not their answers: calling again would pay twice), publish the others. Returns
        how many were published."""
        by_id = dict(zip((r.image_id for r in chunk.images), chunk.position_of(), strict=True))
        have = [
            Outcome(by_id[i], written[i].failed, written[i].plates) for i in by_id if i in written
        ]
        if have:
            self.outcomes.mark(chunk.run_id, chunk.chunk_id, have)
        rest = chunk.subset(lambda _, ref: ref.image_id not in written)
        if rest.images:
            self.publish(rest)
        return len(rest.images)


def _written(dataset: Dataset, run_id: str) -> dict[str, Outcome]:
    """Image id → its outcome as the run's output holds it (position 0: a placeholder)."""
    table = dataset.read_run(run_id, columns=["image_id", "status"])
    out: dict[str, Outcome] = {}
    for image_id, status in zip(table["image_id"].to_pylist(), table["status"].to_pylist(), strict=True):
        seen = out.get(image_id)
        plates = (seen.plates if seen else 0) + (1 if status == "ok" else 0)
        out[image_id] = Outcome(0, status == STATUS_FAILED, plates)
    return out
