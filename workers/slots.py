"""Call slots: at most ``n`` calls in flight per process, handed out oldest chunk first.

A plain FIFO semaphore serves waiters in arrival order, so when a process runs two chunks at
once, an image of the older chunk that comes back for a retry (or to book a new rate-limit slot)
queues behind every first call of the newer chunk, and the older chunk, hence its pool thread,
waits seconds for it. :class:`Slots` serves by ``(priority, arrival)``: the engine numbers
chunks as they start, so an older chunk always goes first and finishes first. Imports nothing
of ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator

__all__ = ["Slots"]


class Slots:
    """``n`` slots for one event loop; lower ``priority`` first, then arrival order."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"need at least one slot, got {n}")
        self.n = n
        self._free = n
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrival = itertools.count()

    @property
    def in_use(self) -> int:
        return self.n - self._free

    @contextlib.asynccontextmanager
    async def hold(self, priority: int = 0) -> AsyncIterator[None]:
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, priority: int = 0) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._arrival), waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted, then cancelled before it resumed: pass the slot on
            raise  # a cancelled waiter still in the heap is skipped by release()

    def release(self) -> None:
        while self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1
