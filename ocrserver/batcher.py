"""Micro-batching for recognizers that gain from batches (``batching = True``).

Calls wait in a queue; one loop task takes the first, then keeps collecting for up to
``max_wait_ms`` or until ``max_batch`` are waiting, and runs ``recognize_batch`` on the lot in a
single worker thread (so the event loop never blocks and the model sees one batch at a time).
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor

from ocrserver.recognizers.base import DetectedPlate, ImageInput, Recognizer

__all__ = ["MicroBatcher"]

_Item = tuple[ImageInput, "asyncio.Future[list[DetectedPlate]]"]


class MicroBatcher:
    def __init__(self, recognizer: Recognizer, max_batch: int = 8, max_wait_ms: float = 5.0) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.recognizer = recognizer
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="carnumber-batch")

    async def submit(self, image: ImageInput) -> list[DetectedPlate]:
        """The plates for one image, recognised as part of a batch."""
        loop = asyncio.get_running_loop()
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._run(self._queue))
        fut: asyncio.Future[list[DetectedPlate]] = loop.create_future()
        await self._queue.put((image, fut))
        return await fut

    async def _run(self, queue: asyncio.Queue[_Item]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0 and queue.empty():
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), max(0.0, timeout)))
                except TimeoutError:
                    break
            images = [img for img, _ in batch]
            try:
                results = await loop.run_in_executor(
                    self._pool, self.recognizer.recognize_batch, images
                )
                if len(results) != len(batch):
                    raise RuntimeError("recognize_batch returned the wrong number of results")
            except Exception as exc:  # hand the failure to every waiting call
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), plates in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(plates)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=False, cancel_futures=True)
