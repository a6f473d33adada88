"""Soft shutdown: a node that stops (SIGTERM from systemd, Compose or Kubernetes; a rolling
restart; an unrecoverable error) hands back at once what it has not called.

Celery's warm shutdown lets running tasks finish, and a chunk can take minutes; its messages
then came back only when the node's lease ran out. Here the consumer's ``close`` (sent when the
worker stops, never on a reconnect) drains the process's engine: no new call starts, calls in
flight finish and are written, and the images not called yet go back to the queue as a chunk of
their own (``workers/runner.py``), so another node takes them within a second. Messages the
node had taken but not started are put back by the broker transport's clean close
(``workers/node/broker.py``). The node then exits: 0 after SIGTERM, non-zero after an error.
Design note: ``ops/design/sink.md`` ("Leases").
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

__all__ = ["DrainOnClose"]

log = logging.getLogger(__name__)


class DrainOnClose(bootsteps.StartStopStep):
    """Consumer bootstep: drain this process's engine when the worker stops."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def close(self, parent: Any) -> None:
        from workers.tasks import drain

        if drain():
            log.warning("shutting down: calls in flight finish, the rest is handed back to the queue")
