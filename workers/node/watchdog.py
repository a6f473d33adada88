"""The consumer bootstep that runs the stalled-run repair (``workers/books/repair.py``) on every node,
one node at a time: every :data:`WATCH_S`, the node that takes the lock (``{prefix}:watch``, a
``SET NX`` that expires before the next round) looks at the recent runs. On a thread of its own in
the node's main process, like the lease keeper; a Redis or output-store error is logged and the
next round tries again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from celery import bootsteps

__all__ = ["WATCH_S", "RunWatch"]

log = logging.getLogger(__name__)

WATCH_S = 30.0


class RunWatch(bootsteps.StartStopStep):
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, parent: Any) -> None:
        if self._thread is None:  # called again after every reconnect: one thread per node
            self._thread = threading.Thread(target=self._loop, name="carnumber-run-watch", daemon=True)
            self._thread.start()

    def shutdown(self, parent: Any) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        from workers.books.outcomes import OutcomeBook
        from workers.books.repair import StalledRuns
        from workers.books.runs import RunStore
        from workers.keys import Keys
        from workers.node.leases import SWEEP_INTERVAL_S
        from workers.redis_client import resilient_redis
        from workers.sink.dataset import open_dataset
        from workers.sink.enqueued import EnqueuedRecords
        from workers.tasks import publish_chunk, settings

        s = settings()
        keys = Keys(s.key_prefix)
        client = resilient_redis(s.broker_url, outage_s=10, **s.redis_access())
        me = f"{socket.gethostname()}:{os.getpid()}"
        try:
            repair = StalledRuns(
                RunStore(client, keys),
                OutcomeBook(client, keys),
                EnqueuedRecords(dataset := open_dataset(s.output)),
                dataset,
                s.queue,
                lambda chunk: publish_chunk(chunk, s.queue),
                stall_s=s.lease_s + 2 * SWEEP_INTERVAL_S,
            )
            while not self._stopped.wait(WATCH_S):
                try:
                    if client.set(keys.watch(), me, nx=True, px=int(WATCH_S * 1000 * 0.8)):
                        repair.check_all()
                except Exception as exc:  # Redis or the output store away: next round
                    log.warning("stalled-run check skipped: %s: %s", type(exc).__name__, exc)
        finally:
            client.close()
