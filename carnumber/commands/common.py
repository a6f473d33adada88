"""What every command does first: build settings once, connect to Redis, point Celery at it."""

from __future__ import annotations

import argparse
from typing import Any

import redis

from workers.books.runs import RunStore
from workers.config import Settings
from workers.errors import ConfigError
from workers.keys import Keys

__all__ = ["configure_celery", "connect_redis", "run_store", "settings_from"]


def settings_from(args: argparse.Namespace, **overrides: Any) -> Settings:
    return Settings.from_env(config_file=getattr(args, "config", None), **overrides)


def connect_redis(settings: Settings) -> redis.Redis:
    """A checked connection; an unreachable Redis is a ConfigError naming REDIS_URL. Once
    connected, commands ride out a Redis restart of up to ``CARNUMBER_REDIS_OUTAGE_S``."""
    from workers.redis_client import resilient_redis
    from workers.redis_connect import redacted, sync_client

    probe = sync_client(settings.broker_url, **settings.redis_access(), socket_connect_timeout=3)
    try:
        probe.ping()
    except (redis.RedisError, OSError) as exc:
        url = redacted(settings.broker_url)
        where = f"REDIS_URL={url}" if settings.redis_url else f"REDIS_URL (unset, so {url})"
        raise ConfigError(f"cannot reach Redis at {where}: {exc}") from None
    finally:
        probe.close()
    return resilient_redis(settings.broker_url, settings.redis_outage_s, **settings.redis_access())


def run_store(settings: Settings, client: redis.Redis) -> RunStore:
    return RunStore(client, Keys(settings.key_prefix))


def configure_celery(settings: Settings) -> None:
    """Make the Celery app use exactly these settings (CLI flags and --config included)."""
    from workers.celery import app, celery_config

    app.conf.update(celery_config(settings))
