"""The per-process engine: chunks run from several threads share one loop and one pool of call
slots, so a process never has more than ``concurrency`` calls in flight, and the next chunk's
calls start while the previous chunk's last ones are still in flight (no idle tail)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from ocrserver.config import ServerConfig
from ocrserver.recognizers.base import DetectedPlate, ImageInput
from ocrserver.recognizers.replay import ReplayRecognizer
from ocrserver.server import RunningServer, start_server
from ocrserver.truth import make_test_image
from workers.config import Settings
from workers.keys import Keys, account_tag
from workers.message import Chunk, ImageRef
from workers.metrics import read_in_flight, write_in_flight
from workers.runner import Runtime, execute_chunk

CONCURRENCY = 3
LATENCY_S = 0.3


class SlowRecognizer(ReplayRecognizer):
    """Replay answers after ``LATENCY_S``, off the server's loop, noting each call's span."""

    inline: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.spans: dict[str, tuple[float, float]] = {}  # plate text -> (start, end)

    def recognize(self, image: ImageInput) -> list[DetectedPlate]:
        start = time.monotonic()
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        time.sleep(LATENCY_S)
        plates = super().recognize(image)
        with self.lock:
            self.in_flight -= 1
            self.spans[plates[0].text] = (start, time.monotonic())
        return plates


@pytest.fixture
def recognizer() -> SlowRecognizer:
    return SlowRecognizer()


@pytest.fixture
def server(recognizer: SlowRecognizer) -> Iterator[RunningServer]:
    with start_server(ServerConfig(keys="engid:engsecret"), recognizer) as srv:
        yield srv


def _chunk(folder: Path, run_id: str, prefix: str, n: int) -> Chunk:
    folder.mkdir(parents=True)
    refs = []
    for i in range(n):
        path = folder / f"{i}.png"
        path.write_bytes(make_test_image([{"text": f"{prefix}{i:05d}", "type": "小型汽车"}]))
        refs.append(ImageRef(path.as_uri()))
    return Chunk(run_id, f"{prefix}-0000", tuple(refs))


def test_chunks_from_two_threads_share_the_slots_and_overlap(
    server: RunningServer,
    recognizer: SlowRecognizer,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    settings = Settings.from_env({
        "CARNUMBER_ENDPOINT": server.url,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "engid",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "engsecret",
        "REDIS_URL": redis_url,
        "CARNUMBER_KEY_PREFIX": key_prefix,
        "CARNUMBER_OUTPUT": str(tmp_path / "out"),
        "CARNUMBER_QPS": "0",
        "CARNUMBER_CONCURRENCY": str(CONCURRENCY),
    })
    first = _chunk(tmp_path / "a", "eng", "京A", 5)
    second = _chunk(tmp_path / "b", "eng", "沪B", 5)
    results = {}
    with Runtime.from_settings(settings) as rt:
        rt.runs.create("eng", "test")
        rt.runs.touch("eng")

        def run(chunk: Chunk) -> None:
            results[chunk.chunk_id] = execute_chunk(chunk, rt)

        threads = [threading.Thread(target=run, args=(c,)) for c in (first, second)]
        threads[0].start()
        time.sleep(0.1)  # the first chunk's images queue for the slots first
        threads[1].start()
        # Each process reports the calls it has in flight, for `carnumber status`.
        deadline = time.monotonic() + 5
        in_flight = (0, 0)
        while in_flight[0] == 0 and time.monotonic() < deadline:
            in_flight = read_in_flight(rt.redis, Keys(key_prefix), account_tag("engid"))
            time.sleep(0.1)
        assert 0 < in_flight[0] <= CONCURRENCY and in_flight[1] == 1
        for t in threads:
            t.join(30)
        rows = rt.dataset.read_run("eng").to_pylist()

    assert [r.answered for r in results.values()] == [5, 5]
    assert len(rows) == 10 and len({r["image_id"] for r in rows}) == 10
    # One pool of slots for the process, not one per chunk.
    assert recognizer.max_in_flight == CONCURRENCY
    spans = recognizer.spans
    first_ends = max(end for text, (_, end) in spans.items() if text.startswith("京A"))
    second_starts = min(start for text, (start, _) in spans.items() if text.startswith("沪B"))
    # The second chunk's first call left while the first chunk's last calls were in flight.
    assert second_starts < first_ends - LATENCY_S / 2


def test_in_flight_counts_only_processes_that_reported_lately(redis_client, key_prefix: str) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(key_prefix)
    write_in_flight(redis_client, keys, "acct", "host-a:1", 7, now_s=1000.0)
    write_in_flight(redis_client, keys, "acct", "host-b:2", 5, now_s=1009.0)
    write_in_flight(redis_client, keys, "acct", "host-c:3", 9, now_s=980.0)  # gone: stopped reporting
    assert read_in_flight(redis_client, keys, "acct", now_s=1010.0) == (12, 2)
