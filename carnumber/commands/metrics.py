"""``carnumber metrics`` — a Prometheus exporter that reads the fleet's state from Redis on each scrape.

``carnumber metrics --port 9808`` serves ``/metrics``; ``carnumber metrics --once`` prints the
exposition text and exits (1 when Redis could not be read), for tests and cron checks such as
``carnumber metrics --once | grep '^carnumber_fleet_stopped{.*} 1'``. Needs the ``monitor`` extra.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import TYPE_CHECKING

from carnumber.commands.common import settings_from

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from workers.config import Settings

__all__ = ["add_arguments", "main", "registry"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=9808, help="listen port (default 9808)")
    parser.add_argument(
        "--addr", default="127.0.0.1", help="listen address (default 127.0.0.1; 0.0.0.0 in a container)"
    )
    parser.add_argument("--runs", type=int, default=20, help="export the N most recent runs (default 20)")
    parser.add_argument("--once", action="store_true", help="print the metrics once and exit")


_REDIS_UP = re.compile(r"^carnumber_redis_up 1\.0$", re.MULTILINE)


def registry(settings: Settings, recent_runs: int = 20) -> CollectorRegistry:
    """A ``CollectorRegistry`` holding only the carnumber collector for ``settings``."""
    from prometheus_client import CollectorRegistry

    from carnumber.exposition import SnapshotCollector
    from carnumber.monitor import Monitor
    from workers.redis_connect import async_client, sync_client

    url = settings.broker_url
    opts = {**settings.redis_access(), "socket_connect_timeout": 3, "socket_timeout": 5}
    monitor = Monitor(
        settings,
        sync_client(url, **opts),
        lambda: async_client(url, **opts),
        recent_runs=recent_runs,
    )
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(monitor.snapshot))
    return reg


def main(args: argparse.Namespace) -> int:
    try:
        from prometheus_client import generate_latest, start_http_server
    except ImportError:
        from workers.errors import ConfigError

        raise ConfigError(
            "carnumber metrics needs prometheus-client: pip install 'carnumber[monitor]'"
        ) from None
    import threading

    reg = registry(settings_from(args), args.runs)
    if args.once:
        text = generate_latest(reg).decode()
        sys.stdout.write(text)
        return 0 if _REDIS_UP.search(text) else 1
    server, _ = start_http_server(args.port, addr=args.addr, registry=reg)
    print(f"carnumber metrics: serving http://{args.addr}:{server.server_port}/metrics", flush=True)
    threading.Event().wait()
    return 0
