"""A worker process's long-lived async engine: one event loop on its own thread, and the services
every chunk shares.

Built once per process (after the fork) and started on first use, it keeps for the life of the
process what a chunk used to build and tear down: the HTTP connection pool (connections stay
open between chunks), the async Redis client, the limiter and quota, the fleet switch and the
breaker, and one pool of ``concurrency`` call slots. :meth:`Engine.run` runs a chunk on that
loop from any thread and blocks until its outcome is known.

Why one pool of slots for the process: a process that runs one chunk at a time books no calls
while its chunk's last ones are in flight, one API latency per chunk, and processes that share a
limit drift into finishing their chunks together. When a process runs two chunks at once (the
worker's threads pool, ``--pool threads --concurrency 2``), both queue for the same
:class:`~workers.slots.Slots`, which serve the older chunk first (its retries too): the second
chunk's images wait behind the first's and take over while its last calls are in flight, so the
process keeps booking across chunk boundaries and its calls in flight never exceed
``concurrency``.

Nothing slow runs on the loop: image reading goes to threads, and call counters are written to
Redis from a thread every ``flush_s``, so a waiter woken for its slot is never held up by them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from workers.admission import Gate
from workers.api.client import AsyncClient, http_timeout
from workers.books.spill import AnswerSpill, default_spill_dir
from workers.config import Settings
from workers.credentials import provider_from_settings
from workers.keys import Keys, account_tag
from workers.message import Chunk
from workers.metrics import CallCounter, prune_in_flight, write_in_flight
from workers.pipeline import ChunkContext, ChunkResult, Resolver, process_chunk
from workers.redis_connect import async_client
from workers.slots import Slots

__all__ = ["Engine"]

log = logging.getLogger(__name__)


class Engine:
    """Runs chunks for one process on one event loop with shared services (see the module).

    ``counter``: where call outcomes are counted (written to Redis every ``counter.flush_s``
    from a thread, and when a chunk ends). Thread-safe; :meth:`close` when done (a daemon
    thread otherwise dies with the process).
    """

    def __init__(self, settings: Settings, resolver: Resolver, counter: CallCounter | None = None) -> None:
        self.settings = settings
        self.resolver = resolver
        self.counter = counter
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ctx: ChunkContext | None = None
        self._closers: list[Any] = []
        self._flusher: asyncio.Task[None] | None = None
        self._started_chunks = 0
        self._spill: AnswerSpill | None = None
        self._pruned_at = 0.0

    def run(self, chunk: Chunk) -> ChunkResult:
        """Process ``chunk`` on the engine's loop; blocks the calling thread until it is done
        (and cancels it if that thread is interrupted)."""
        future = asyncio.run_coroutine_threadsafe(self._process(chunk), self._started())
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def drain(self) -> None:
        """The node shuts down: calls in flight finish, images not called yet come back pending
        (``ShuttingDown``), and chunks that start from now on call nothing. Thread-safe."""
        with self._lock:
            loop, ctx = self._loop, self._ctx
        if loop is not None and ctx is not None:
            loop.call_soon_threadsafe(ctx.drain)

    def close(self) -> None:
        """Close connections and stop the loop's thread. Idempotent."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._aclose(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()

    # -- internals ----------------------------------------------------------------------------
    def _started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="carnumber-engine", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    async def _process(self, chunk: Chunk) -> ChunkResult:
        self._started_chunks += 1  # on the loop: chunks are numbered in the order they start
        number = self._started_chunks
        try:
            ctx = await self._context()
            await asyncio.to_thread(self._replay_spill)  # answers a retry of this chunk may need
            return await process_chunk(chunk, ctx, number)
        finally:
            if self.counter is not None:
                await asyncio.to_thread(self.counter.flush)

    async def _context(self) -> ChunkContext:
        """The shared services, built on the loop by the first chunk (no await before the
        assignment, so two first chunks cannot build two)."""
        if self._ctx is not None:
            return self._ctx
        from workers.answer_cache import AnswerCache
        from workers.books.control import RunSwitch
        from workers.books.journal import AnswerJournal
        from workers.earlier import EarlierAnswers
        from workers.fleet import CircuitBreaker, FleetControl
        from workers.ratelimit import from_settings as limits_from_settings
        from workers.retry import RetryPolicy
        from workers.sink.dataset import open_dataset

        s = self.settings
        creds = provider_from_settings(s)  # asked at each signing; shared by the process's calls
        self._spill = AnswerSpill(Path(s.spill_dir) if s.spill_dir else default_spill_dir())
        keys = Keys(s.key_prefix)
        account = account_tag(s.limit_group())
        # Short timeouts: an unreachable Redis must hold calls quickly, not hang a chunk.
        opts = {"socket_timeout": 10, "socket_connect_timeout": 5, "socket_keepalive": True}
        ar = async_client(s.broker_url, **s.redis_access(), **opts)
        limits = httpx.Limits(max_connections=s.concurrency, max_keepalive_connections=s.concurrency)
        http = httpx.AsyncClient(timeout=http_timeout(s), limits=limits)
        limiter, quota = limits_from_settings(s, ar)
        fleet = FleetControl(ar, keys, account)
        breaker = CircuitBreaker(ar, keys, account)
        self._ctx = ChunkContext(
            client=AsyncClient(s.endpoint, creds, http),
            resolver=self.resolver,
            gate=Gate(fleet=fleet, breaker=breaker, limiter=limiter, quota=quota, runs=RunSwitch(ar, keys)),
            policy=RetryPolicy.from_settings(s),
            fleet=fleet,
            breaker=breaker,
            slots=Slots(s.concurrency),
            on_call=self._on_call if self.counter is not None else None,
            journal=AnswerJournal(ar, keys, ttl_s=s.journal_ttl_s, claim_ms=_claim_ms(s)),
            redis_outage_s=s.redis_outage_s,
            earlier=(earlier := EarlierAnswers(AnswerCache.beside(open_dataset(s.output)), ar, keys)),
            spill=self._spill,
        )

        async def close_cache() -> None:
            earlier.close()

        self._closers = [http.aclose, ar.aclose, close_cache]
        if self.counter is not None:
            self._flusher = asyncio.ensure_future(self._flush_every(self.counter))
        return self._ctx

    def _on_call(self, run_id: str, code: str, elapsed_s: float) -> None:
        assert self.counter is not None
        self.counter.record(code, elapsed_s, run_id=run_id)

    def _replay_spill(self) -> None:
        """Put spilled answers into the journal once Redis answers again (logged, never raised)."""
        if self._spill is None or self.counter is None or not self._spill.pending():
            return
        from workers.books.journal import replay_into

        put = replay_into(self.counter.r, Keys(self.settings.key_prefix), self.settings.journal_ttl_s)
        try:
            self._spill.replay(put)
        except (redis.RedisError, OSError) as exc:
            log.debug("spilled answers not replayed yet: %s", exc)

    async def _flush_every(self, counter: CallCounter) -> None:
        process = f"{socket.gethostname()}:{os.getpid()}"
        while True:
            await asyncio.sleep(counter.flush_s)
            await asyncio.to_thread(counter.flush)
            await asyncio.to_thread(self._replay_spill)
            slots = self._ctx.slots if self._ctx is not None else None
            if slots is not None:  # for `carnumber status`: this process's calls in flight
                await asyncio.to_thread(self._write_in_flight, counter, process, slots.in_use)

    def _write_in_flight(self, counter: CallCounter, process: str, calls: int) -> None:
        now = time.time()
        try:
            write_in_flight(counter.r, counter.keys, counter.account, process, calls, now)
            if now - self._pruned_at >= 60:  # one field per process ever started, else
                self._pruned_at = now
                prune_in_flight(counter.r, counter.keys, counter.account, now)
        except (redis.RedisError, OSError) as exc:
            log.debug("calls in flight not written: %s", exc)

    async def _aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            # A flusher that died of a bug must not keep the connections open.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._flusher
        for close in self._closers:
            with contextlib.suppress(Exception):
                await close()
        self._ctx, self._closers, self._flusher = None, [], None


def _claim_ms(s: Settings) -> int:
    """A claim outlives one image's longest quiet stretch: a backoff wait, then a whole attempt."""
    return int((s.retry_cap_s + s.connect_timeout_s + s.read_timeout_s + 15.0) * 1000)
