"""How the server calls recognizers: batching ones through the micro-batcher, others in a thread."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import ClassVar

import httpx
import pytest

from ocrserver.recognizers.base import DetectedPlate, ImageInput, Recognizer
from ocrserver.server import ServerConfig, start_server
from ocrserver.truth import make_test_image, read_truth
from workers.api.client import AsyncClient, Client, Image
from workers.config import Credentials
from workers.errors import RetryableApiError

CREDS = Credentials("testid", "testsecret")


class SlowBatching(Recognizer):
    """Reads the embedded truth, 50 ms per batch, and records the batch sizes it saw."""

    name: ClassVar[str] = "slow-batching"
    batching: ClassVar[bool] = True

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.threads: set[str] = set()

    def recognize(self, image: ImageInput) -> list[DetectedPlate]:
        return read_truth(image.data) or []

    def recognize_batch(self, images: list[ImageInput]) -> list[list[DetectedPlate]]:
        self.batches.append(len(images))
        self.threads.add(threading.current_thread().name)
        time.sleep(0.05)
        return [self.recognize(i) for i in images]


class Blocking(Recognizer):
    """A CPU-bound stand-in: 200 ms of blocking work per image; fails on demand."""

    name: ClassVar[str] = "blocking"

    def recognize(self, image: ImageInput) -> list[DetectedPlate]:
        time.sleep(0.2)
        plates = read_truth(image.data) or []
        if plates and plates[0].text == "BOOM":
            raise RuntimeError("model exploded")
        return plates


async def _many(url: str, bodies: list[bytes]) -> list[list[str]]:
    async with httpx.AsyncClient(timeout=10) as http:
        client = AsyncClient(url, CREDS, http)
        got = await asyncio.gather(*(client.recognize(Image(body=b)) for b in bodies))
    return [[p.text for p in r.plates] for r in got]


def test_batching_recognizer_gets_batches_off_the_loop() -> None:
    rec = SlowBatching()
    bodies = [make_test_image([f"浙A{i:05d}"]) for i in range(12)]
    with start_server(ServerConfig(max_batch=4, max_wait_ms=20), recognizer=rec) as srv:
        got = asyncio.run(_many(srv.url, bodies))
    assert got == [[f"浙A{i:05d}"] for i in range(12)]  # each answer is its own image's
    assert sum(rec.batches) == 12 and max(rec.batches) > 1 and max(rec.batches) <= 4
    assert all(name.startswith("carnumber-batch") for name in rec.threads)


def test_blocking_recognizer_runs_in_threads_and_errors_are_internal_errors() -> None:
    bodies = [make_test_image([f"粤B{i:05d}"]) for i in range(6)]
    with start_server(ServerConfig(), recognizer=Blocking()) as srv:
        t0 = time.monotonic()
        got = asyncio.run(_many(srv.url, bodies))
        elapsed = time.monotonic() - t0
        assert got == [[f"粤B{i:05d}"] for i in range(6)]
        assert elapsed < 0.9  # 6 x 200 ms did not run one after another on the event loop
        with httpx.Client() as http, pytest.raises(RetryableApiError) as err:
            Client(srv.url, CREDS, http).recognize(Image(body=make_test_image(["BOOM"])))
        assert (err.value.status, err.value.code) == (500, "InternalError")
        assert "exploded" not in err.value.message
