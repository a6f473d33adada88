"""The answer journal with real Redis, the real engine and the local server: a chunk cut short is
finished from the journal without paying again; two holders of one chunk (a lease that ran out
under a live process) never pay twice for an image; a holder that finds the chunk's part written
by the other stops at once; Redis keeps no answer once its part is counted."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ocrserver.config import ServerConfig
from ocrserver.server import RunningServer, start_server
from ocrserver.truth import distinct_copy, make_test_image
from workers.books.journal import Answer, MemoryJournal
from workers.config import Settings
from workers.keys import Keys
from workers.message import Chunk, ImageRef
from workers.runner import Runtime, execute_chunk

pytestmark = pytest.mark.timeout(120)
KEY_ID, SECRET = "jrnid", "jrn-secret-0123456789"


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with start_server(ServerConfig(keys=f"{KEY_ID}:{SECRET}", latency_ms=50)) as srv:
        yield srv


def _calls(server: RunningServer) -> int:
    return int(httpx.get(f"{server.url}/__carnumber/stats").json()["accepted_total"])


def _chunk(folder: Path, n: int = 24) -> Chunk:
    folder.mkdir()
    refs = []
    for i in range(n):
        path = folder / f"img-{i:03d}.png"
        path.write_bytes(distinct_copy(make_test_image([{"text": f"苏A{i:05d}"}] if i % 4 else []), i))
        refs.append(ImageRef(path.as_uri()))
    return Chunk("j1", "0000000", tuple(refs))


@pytest.fixture
def runtimes(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path
) -> Iterator[list[Runtime]]:
    settings = Settings.from_env(
        {
            "CARNUMBER_ENDPOINT": server.url,
            "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET,
            "REDIS_URL": redis_url,
            "CARNUMBER_KEY_PREFIX": key_prefix,
            "CARNUMBER_OUTPUT": str(tmp_path / "out"),
            "CARNUMBER_QPS": "0",
            "CARNUMBER_CONCURRENCY": "4",
        }
    )
    rts = [Runtime.from_settings(settings), Runtime.from_settings(settings)]  # two worker processes
    rts[0].runs.create("j1", "test")
    rts[0].runs.touch("j1")
    yield rts
    for rt in rts:
        rt.close()


def _answers(rt: Runtime) -> int:
    return int(rt.redis.hlen(Keys(rt.settings.key_prefix).run_answers("j1")))


def _rows_once(rt: Runtime, images: int) -> None:
    rows = rt.dataset.read_run("j1").to_pylist()
    firsts = [r["image_id"] for r in rows if r["plate_index"] in (0, None)]
    assert len(firsts) == images and len(set(firsts)) == images


def test_a_chunk_cut_short_is_finished_from_the_journal(
    runtimes: list[Runtime], server: RunningServer, tmp_path: Path
) -> None:
    rt = runtimes[0]
    chunk = _chunk(tmp_path / "a")
    rt.runs.mark_enqueued("j1", chunk.chunk_id, "d", len(chunk.images))
    # The worker got every answer, then died before writing the part (no ack: redelivered).
    first = rt.engine.run(chunk)
    assert first.calls == 24 and _answers(rt) == 24
    summary = rt.runs.get("j1")  # the calls were counted into the run as they were made
    assert summary is not None and int(summary.fields["calls"]) == 24
    again = execute_chunk(chunk, rt)
    assert again.calls == 0 and again.journalled == 24 and _calls(server) == 24
    summary = rt.runs.get("j1")
    assert summary is not None and int(summary.fields["calls"]) == 24  # and not again
    _rows_once(rt, 24)
    assert _answers(rt) == 0  # forgotten once the part is counted: Redis stays flat


def test_two_holders_of_one_chunk_never_pay_twice(
    runtimes: list[Runtime], server: RunningServer, tmp_path: Path
) -> None:
    chunk = _chunk(tmp_path / "b", 40)
    results = []

    def hold(rt: Runtime) -> None:
        results.append(execute_chunk(chunk, rt))

    threads = [threading.Thread(target=hold, args=(rt,)) for rt in runtimes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 2
    assert _calls(server) == 40  # claims split the images between the holders
    _rows_once(runtimes[0], 40)


def test_a_late_holder_stops_once_the_other_wrote_the_part(
    runtimes: list[Runtime], server: RunningServer, tmp_path: Path
) -> None:
    chunk = _chunk(tmp_path / "c")
    runtimes[0].runs.mark_enqueued("j1", chunk.chunk_id, "d", len(chunk.images))
    assert execute_chunk(chunk, runtimes[0]).calls == 24  # written and counted: the run is done
    assert _answers(runtimes[0]) == 0  # and its journal dropped
    late = runtimes[1].engine.run(chunk)  # a holder whose lease ran out, carrying on
    assert len(late.superseded) == 24 and not late.rows and not late.pending and late.calls == 0
    assert execute_chunk(chunk, runtimes[1]).calls == 0
    assert _calls(server) == 24
    _rows_once(runtimes[0], 24)


def test_the_memory_journal_behaves_like_the_redis_one() -> None:
    import asyncio

    async def main() -> None:
        j = MemoryJournal()
        assert await j.claim("r", "i", "a") is None
        held = await j.claim("r", "i", "b")
        assert held is not None and not isinstance(held, Answer)
        assert await j.record("r", "i", Answer(1, error={"code": "x"}), "a")
        got = await j.claim("r", "i", "b")
        assert isinstance(got, Answer) and got.attempts == 1

    asyncio.run(main())
