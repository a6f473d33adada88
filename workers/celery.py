"""The Celery application: ``celery -A workers worker`` finds :data:`app` here.

Configuration is a promise (``add_defaults`` with a callable): the environment is read once, when
Celery first needs its settings, not at import time.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from workers.config import Settings

__all__ = ["app", "celery_config"]

# Longer than any chunk can take: chunk_size / (fleet share of QPS). 200 images at 0.1 call/s
# each (a 100-process fleet on 10 QPS) is 2,000 s; 12 h leaves room for quota pauses and retries.
VISIBILITY_TIMEOUT_S = 12 * 3600


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for a reliable Redis broker: late acks, requeue on a lost worker,
    one chunk prefetched per process, no result backend (results go to Parquet)."""
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT_S},
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_default_queue": settings.queue,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_track_started": True,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


app = Celery("carnumber", include=["workers.tasks"])
app.add_defaults(lambda: celery_config(Settings.from_env()))
