"""The Celery task: decode, call :func:`execute_chunk`, map errors. Nothing else lives here."""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any

import pyarrow as pa
import redis
from celery import signals
from celery.exceptions import WorkerShutdown

from workers.celery import app
from workers.config import Settings
from workers.credentials import check_credentials
from workers.errors import ConfigError, StorageCredentialsError
from workers.message import Chunk
from workers.runner import Runtime, execute_chunk
from workers.storage.objects import refused_credentials

__all__ = ["TASK_NAME", "drain", "process_chunk", "publish_chunk", "use_settings"]

log = logging.getLogger(__name__)
TASK_NAME = "carnumber.process_chunk"
STORAGE_CODE = StorageCredentialsError.code
_runtime: Runtime | None = None
_settings: Settings | None = None
_runtime_lock = threading.Lock()  # the threads pool: every thread of a process shares one


def use_settings(settings: Settings) -> None:
    """Settings built by the CLI (flags, --config); forked pool processes inherit them."""
    global _settings, _runtime
    _settings, _runtime = settings, None


def settings() -> Settings:
    return _settings if _settings is not None else Settings.from_env()


def runtime() -> Runtime:
    """This process's services, built once and shared by its pool threads (one engine, so
    chunks run at once share one pool of call slots)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            s = settings()
            _runtime = Runtime.from_settings(s)
            _runtime.hand_back = lambda chunk: publish_chunk(chunk, s.queue)
        return _runtime


def drain() -> bool:
    """The node shuts down: this process's running chunks finish their calls in flight and hand
    back the rest (``workers/node/shutdown.py``). Returns whether there was an engine to drain."""
    with _runtime_lock:
        rt = _runtime
    if rt is None:
        return False
    rt.engine.drain()
    return True


@signals.worker_process_init.connect
def _fresh_runtime_after_fork(**_: Any) -> None:
    # Connections and the engine's thread must not be shared across a fork.
    global _runtime, _runtime_lock
    _runtime, _runtime_lock = None, threading.Lock()


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _close_runtime(**_: Any) -> None:
    global _runtime
    with _runtime_lock:
        rt, _runtime = _runtime, None
    if rt is not None:
        rt.close()


@signals.worker_init.connect
def _check_settings(**_: Any) -> None:
    """Refuse to start a worker that could only fail every chunk."""
    try:
        source = check_credentials(settings())  # fetched once: an unreachable source fails here
        log.info("carnumber worker: credentials from %s", source)
    except ConfigError as exc:
        log.critical("carnumber worker cannot start: %s", exc)
        raise WorkerShutdown(str(exc)) from None


@signals.worker_init.connect
def _warm_up(**_: Any) -> None:
    """Before the pool starts, so no call is delivered late after its rate-limit slot: load
    what httpx and the first Parquet write import lazily (forked pool processes inherit it),
    then freeze what start-up allocated out of the garbage collector's reach. Unfrozen, one
    full collection of a worker's ~70,000 start-up objects stalls its event loop for ~20 ms,
    twice the pacing guard; frozen, it scans only what chunks allocate (and forked children
    stop touching, so copying, those pages)."""
    from workers.api.client import warm_up as warm_up_http
    from workers.sink.dataset import warm_up as warm_up_parquet

    warm_up_http()
    warm_up_parquet()
    gc.freeze()


@app.task(
    name=TASK_NAME,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    # Infrastructure trouble (Redis, output store) is retried; a chunk is never dropped for it.
    autoretry_for=(redis.RedisError, OSError, pa.ArrowException),
    retry_backoff=5,
    retry_backoff_max=600,
    max_retries=None,
)
def process_chunk(self: Any, message: dict[str, Any]) -> dict[str, int]:
    chunk = Chunk.from_wire(message)
    try:
        result = execute_chunk(chunk, runtime())
    except OSError as exc:
        if refused_credentials(exc):
            # The output store refuses our key: every chunk's write would fail alike. Stop the
            # fleet as for a fatal code (images pending until `carnumber resume`); this chunk is
            # retried below, its paid answers waiting in the journal.
            _stop_fleet(f"the output store refused our credentials ({exc})", chunk.run_id)
        raise
    return {
        "images": len(chunk.images),
        "answered": result.answered,
        "failed": result.failed,
        "pending": len(result.pending),
        "calls": result.calls,
    }


def _stop_fleet(message: str, run_id: str) -> None:
    import asyncio

    from workers.fleet import FleetControl
    from workers.redis_connect import async_client

    async def stop() -> None:
        client = async_client(settings().broker_url, **settings().redis_access())
        try:
            await FleetControl.from_settings(client, settings()).stop(STORAGE_CODE, message, run_id)
        finally:
            await client.aclose()

    try:
        asyncio.run(stop())
    except (redis.RedisError, OSError) as exc:  # the retry below tries again
        log.warning("fleet stop for the output store not written: %s", type(exc).__name__)


def publish_chunk(chunk: Chunk, queue: str) -> None:
    """Send one chunk to the broker; Flower shows the short ``argsrepr``, not every source."""
    process_chunk.apply_async(
        args=[chunk.to_wire()],
        queue=queue,
        argsrepr=f"run={chunk.run_id} chunk={chunk.chunk_id} images={len(chunk.images)}",
    )
