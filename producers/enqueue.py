"""Stream image refs into chunk messages, with backpressure and without duplicates.

Chunk ``k`` is always the ``k``-th run of ``chunk_size`` refs *in source order*, before any
filtering, so re-running the same command for the same run produces the same chunk ids and
skips every chunk already published (``RunStore.mark_enqueued`` guards the count). A chunk whose
images differ from what was recorded (the source changed) is an error, never a silent skip. Images
already answered in earlier runs are dropped from each chunk through the ledger; the chunk id
stays the same. The broker queue is kept under ``queue_high_water`` messages: the producer
waits instead of pushing millions of messages into Redis. Memory holds one chunk at a time.
``record`` (see :mod:`workers.sink.enqueued`) is handed each chunk *before* it is published, and
chunks whose images were all dropped too, so ``carnumber verify`` knows exactly what was promised.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from workers.books.runs import REPAIRED, RunStore
from workers.config import Settings
from workers.errors import InputError
from workers.message import Chunk, ImageRef

__all__ = ["EnqueueReport", "EnqueueTracker", "enqueue", "enqueue_to_broker"]

log = logging.getLogger(__name__)


class Ledger(Protocol):
    def answered(self, image_ids: Sequence[str]) -> set[str]: ...


@dataclass(slots=True)
class EnqueueReport:
    run_id: str
    images_seen: int = 0
    images_enqueued: int = 0
    images_already_answered: int = 0
    duplicates_dropped: int = 0
    chunks_published: int = 0
    chunks_already_published: int = 0
    waited_s: float = 0.0
    stopped_by: str | None = None  # the run paused (quota, fatal stop) before the source ended


def _batches(refs: Iterable[ImageRef], size: int) -> Iterator[list[ImageRef]]:
    it = iter(refs)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _wait_for_room(depth: Callable[[], int], high_water: int, sleep: Callable[[float], None]) -> float:
    """Block while the queue holds ``high_water`` messages or more; resume below half of it."""
    if depth() < high_water:
        return 0.0
    started = time.monotonic()
    delay = 0.05
    while depth() > high_water // 2:
        sleep(delay)
        delay = min(delay * 2, 1.0)
    return time.monotonic() - started


def enqueue(
    refs: Iterable[ImageRef],
    run_id: str,
    *,
    runs: RunStore,
    publish: Callable[[Chunk], None],
    queue_depth: Callable[[], int],
    chunk_size: int,
    queue_high_water: int,
    ledger: Ledger | None = None,
    chunk_prefix: str = "",
    paused_reason: Callable[[], str | None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_progress: Callable[[EnqueueReport], None] | None = None,
    record: Callable[[Chunk], None] | None = None,
) -> EnqueueReport:
    """Publish ``refs`` for ``run_id``; safe to run again for the same run. ``chunk_prefix``
    names a separate pass over the same run (``retry1-``), so its chunk ids never collide.
    ``paused_reason`` is asked before each chunk; a non-empty answer ends the loop early.
    ``record`` gets every newly enqueued chunk (with no images when all were dropped) before it
    is published or counted; an error it raises stops the producer there, and a re-run resumes
    from that chunk. Raises :class:`InputError` when the source changed under the run id."""
    report = EnqueueReport(run_id)
    for k, batch in enumerate(_batches(refs, chunk_size)):
        if paused_reason is not None and (reason := paused_reason()):
            # Feeding a paused fleet would only park everything; a re-run continues from here.
            report.stopped_by = reason
            break
        report.images_seen += len(batch)
        chunk_id = f"{chunk_prefix}{k:07d}"
        digest = hashlib.sha256("\n".join(r.image_id for r in batch).encode()).hexdigest()[:16]
        recorded = runs.enqueued_digest(run_id, chunk_id)
        if recorded == digest or (recorded or "").startswith(REPAIRED):
            report.chunks_already_published += 1
            continue
        if recorded is not None:
            raise InputError(
                f"run {run_id}: the source changed since it was enqueued (chunk {chunk_id} now lists "
                "other images); enqueue the new images under a new run id (images answered in earlier "
                "runs are skipped) instead of reusing this one"
            )
        unique = list({r.image_id: r for r in batch}.values())
        report.duplicates_dropped += len(batch) - len(unique)
        skipped = 0
        if ledger is not None:
            answered = ledger.answered([r.image_id for r in unique])
            if answered:
                unique = [r for r in unique if r.image_id not in answered]
                skipped = len(answered)
                report.images_already_answered += skipped
        chunk = Chunk(run_id, chunk_id, tuple(unique))
        if unique:
            report.waited_s += _wait_for_room(queue_depth, queue_high_water, sleep)
        if record is not None:
            record(chunk)  # before publishing: a crash in between leaves "missing", never "unknown"
        if unique:
            publish(chunk)
            report.chunks_published += 1
            report.images_enqueued += len(unique)
        runs.mark_enqueued(run_id, chunk_id, digest, len(unique), skipped)
        if on_progress is not None and k % 50 == 0:
            on_progress(report)
    return report


def enqueue_to_broker(
    refs: Iterable[ImageRef],
    run_id: str,
    *,
    settings: Settings,
    redis_client: redis.Redis,
    runs: RunStore,
    **options: Any,
) -> EnqueueReport:
    """:func:`enqueue` wired to the Celery broker of ``settings``: chunks go to its queue, whose
    length (``LLEN`` of the Redis list) is the backpressure signal. The URLs of sealed refs (signed
    links: never in a message) go to the sealed-URL store before their chunk is published."""
    from workers.keys import Keys
    from workers.storage.sealed import SealedUrls
    from workers.tasks import publish_chunk

    sealed = SealedUrls(redis_client, Keys(settings.key_prefix), settings.journal_ttl_s)

    def publish(chunk: Chunk) -> None:
        sealed.put(chunk.images)
        publish_chunk(chunk, settings.queue)

    return enqueue(
        refs,
        run_id,
        runs=runs,
        publish=publish,
        queue_depth=lambda: int(redis_client.llen(settings.queue)),
        chunk_size=settings.chunk_size,
        queue_high_water=settings.queue_high_water,
        **options,
    )


class EnqueueTracker:
    """The run's books' view of one source's enqueue (``RunStore.enqueue_progress``): ``running``
    with a heartbeat every ``beat_s`` from a thread (through long waits for room in the queue or
    an answer-cache update too), then ``complete``, or ``incomplete`` with why — a run is not done
    while a source is being enqueued, nor when one was not enqueued to its end.

    Use as a context manager; set :attr:`report` to the :class:`EnqueueReport` before leaving."""

    def __init__(
        self, runs: RunStore, run_id: str, source: str, argv: list[str], beat_s: float = 10.0
    ) -> None:
        self.runs = runs
        self.run_id = run_id
        self.source = source
        self.argv = argv
        self.beat_s = beat_s
        self.report: EnqueueReport | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="carnumber-enqueue-heartbeat", daemon=True)

    def published(self) -> int:
        return self.report.images_enqueued if self.report is not None else 0

    def on_progress(self, report: EnqueueReport) -> None:
        self.report = report

    def _say(self, state: str, reason: str = "") -> None:
        self.runs.enqueue_progress(self.run_id, self.source, state, self.published(), self.argv, reason)

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            with contextlib.suppress(Exception):  # a Redis restart: the next beat makes up for it
                self._say("running")

    def __enter__(self) -> EnqueueTracker:
        self._say("running")
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _tb: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if exc is not None:  # Ctrl-C, a source that changed, the output store refusing
            with contextlib.suppress(Exception):
                self._say("incomplete", f"{type(exc).__name__}: {exc}"[:300])
        elif self.report is not None and self.report.stopped_by is not None:
            self._say("incomplete", f"run {self.report.stopped_by}")
        else:
            self._say("complete")
