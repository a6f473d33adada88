"""The Celery application: ``celery -A workers worker`` finds :data:`app` here.

Configuration is a promise (``add_defaults`` with a callable): the environment is read once, when
Celery first needs its settings, not at import time.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from workers.config import Settings
from workers.node.broker import transport_for
from workers.node.leases import LeaseKeeper
from workers.node.shutdown import DrainOnClose
from workers.node.watchdog import RunWatch
from workers.redis_connect import broker_options

__all__ = ["app", "celery_config"]

# Kombu's own redelivery of unacknowledged messages stays out of the way: chunk leases
# (workers/node/leases.py) hand a silent node's chunks back within about a minute on Redis's clock.
VISIBILITY_TIMEOUT_S = 12 * 3600


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for a reliable Redis broker: late acks, requeue on a lost worker, leases
    on held chunks, one chunk prefetched per process, no result backend (results go to Parquet),
    and connections that notice a dead Redis instead of hanging on it."""
    # TLS with certificate verification on unless the URL turns it off; Sentinel's master name
    # and password (workers/redis_connect.py).
    broker = broker_options(settings.broker_url, **settings.redis_access())
    return {
        "broker_url": broker["broker_url"],
        "broker_use_ssl": broker.get("broker_use_ssl", False),
        # Kombu's Redis transport, repaired: a lost connection never crashes the node, what it
        # holds stays leased across it, and leases start on Redis's clock (workers/node/broker.py).
        "broker_transport": transport_for(settings.broker_url),
        "broker_connection_retry_on_startup": True,
        # A Redis restart of up to CARNUMBER_REDIS_OUTAGE_S: reconnect (1 s, 2 s, ... 10 s apart),
        # then exit non-zero for the supervisor rather than retry forever.
        "broker_connection_retry": True,
        "broker_connection_max_retries": max(10, int(settings.redis_outage_s / 10) + 5),
        "broker_transport_options": {
            "visibility_timeout": VISIBILITY_TIMEOUT_S,
            "socket_timeout": 30,
            "socket_connect_timeout": 5,
            "socket_keepalive": True,
            "health_check_interval": 10,
            **broker.get("broker_transport_options", {}),
        },
        # Producers publishing during a Redis restart wait for it instead of failing.
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": max(10, int(settings.redis_outage_s / 5)),
            "interval_start": 0.2,
            "interval_step": 1.0,
            "interval_max": 5.0,
        },
        "carnumber_lease_s": settings.lease_s,
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
app.steps["consumer"].add(LeaseKeeper)
app.steps["consumer"].add(DrainOnClose)
app.steps["consumer"].add(RunWatch)
