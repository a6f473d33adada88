"""An unreadable 200 answer through the real pipeline: the local server on loopback answers every
call with a body that is not the documented envelope, real Redis, real Parquet, real httpx.

Each picture costs two paid calls (the answer and one retry), then fails with
``local.unreadableAnswer`` and the start of the answer in its message; both calls are in the run's
call count; the failure is journalled, so a later copy of the picture in the run pays nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest
from helpers.http_host import http_host

from ocrserver.config import ServerConfig
from ocrserver.faults import FaultConfig
from ocrserver.server import RunningServer, start_server
from ocrserver.truth import make_test_image
from producers.enqueue import enqueue
from workers.config import Settings
from workers.keys import Keys, account_tag
from workers.message import Chunk, ImageRef
from workers.metrics import read_call_stats
from workers.runner import Runtime, execute_chunk

# Before the fix each picture cost 6 calls and the copies more: the breaker opened and the chunk
# waited for it; fail in a minute instead of the suite's two.
pytestmark = pytest.mark.timeout(60)

KEY_ID, SECRET = "unreadid", "unread-secret-0123456789"
CODE = "local.unreadableAnswer"


@pytest.fixture
def runtimes() -> Iterator[list[Runtime]]:
    opened: list[Runtime] = []
    yield opened
    for rt in opened:
        rt.close()


def _serve(shape: str) -> RunningServer:
    faults = FaultConfig(rate_malformed=1.0, malformed_shape=shape)
    return start_server(ServerConfig(keys=f"{KEY_ID}:{SECRET}", faults=faults, seed=1))


def _runtime(server: RunningServer, redis_url: str, key_prefix: str, tmp: Path) -> Runtime:
    return Runtime.from_settings(
        Settings.from_env(
            {
                "CARNUMBER_ENDPOINT": server.url,
                "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET,
                "REDIS_URL": redis_url,
                "CARNUMBER_KEY_PREFIX": key_prefix,
                "CARNUMBER_OUTPUT": str(tmp / "out"),
                "CARNUMBER_QPS": "0",
                "CARNUMBER_RETRY_BASE_S": "0.01",
                "CARNUMBER_RETRY_CAP_S": "0.02",
                "CARNUMBER_MAX_ATTEMPTS": "6",
            }
        )
    )


def _pictures(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"p{i}.png"
        path.write_bytes(make_test_image([{"text": f"沪B{i:05d}", "type": "小型汽车"}]))
        paths.append(path)
    return paths


def _requests(server: RunningServer) -> int:
    return int(httpx.get(f"{server.url}/__carnumber/stats").json()["requests_total"])


def _enqueue(rt: Runtime, run_id: str, refs: list[ImageRef], chunk_size: int) -> list[Chunk]:
    """The producer's real bookkeeping, publishing into a list instead of the broker."""
    chunks: list[Chunk] = []
    rt.runs.create(run_id, "test")
    enqueue(refs, run_id, runs=rt.runs, publish=chunks.append, queue_depth=lambda: 0,
            chunk_size=chunk_size, queue_high_water=100)
    rt.runs.touch(run_id)
    return chunks


@pytest.mark.parametrize("shape", ["truncated", "wrong-types"])
def test_an_unreadable_answer_costs_two_calls_then_fails_once_for_every_copy(
    shape: str, redis_url: str, key_prefix: str, tmp_path: Path, runtimes: list[Runtime]
) -> None:
    a, b, c = _pictures(tmp_path / "pics", 3)
    copies = [tmp_path / "pics" / "copy of p0.png", tmp_path / "pics" / "late copy of p1.png"]
    copies[0].write_bytes(a.read_bytes())
    copies[1].write_bytes(b.read_bytes())
    refs = [ImageRef(p.as_uri()) for p in (a, b, c, *copies)]
    with _serve(shape) as server:
        rt = _runtime(server, redis_url, key_prefix, tmp_path)
        runtimes.append(rt)
        first_chunk, later_chunk = _enqueue(rt, "u1", refs, chunk_size=4)
        result = execute_chunk(first_chunk, rt)
        paid = _requests(server)

        # Three distinct pictures, two calls each; the copy reuses its picture's failure.
        assert paid == 6 and result.calls == 6
        assert (result.failed, result.answered, result.pending, result.journalled) == (4, 0, [], 1)
        rows = {r["image_id"]: r for r in rt.dataset.read_run("u1").to_pylist()}
        assert {r["error_code"] for r in rows.values()} == {CODE}
        assert all(r["retryable"] for r in rows.values())  # `retry-failures` may try them again
        first, again = rows[refs[0].image_id], rows[refs[3].image_id]
        assert (first["attempts"], again["attempts"], again["answered_by"]) == (2, 0, refs[0].image_id)
        assert "gave up after 2 calls" in first["error_message"]
        assert "answer" in first["error_message"] and first["request_id"]
        # Both paid calls are the run's calls and the metrics' calls, under the new code.
        summary = rt.runs.get("u1")
        assert summary is not None and int(summary.fields["calls"]) == 6
        stats = read_call_stats(rt.redis, Keys(key_prefix), account_tag(KEY_ID))
        assert stats.by_code == {CODE: 6}

        # A later chunk of the run with another copy of a failed picture pays nothing.
        later = execute_chunk(later_chunk, rt)
        assert later.calls == 0 and later.journalled == 1 and later.failed == 1
        assert _requests(server) == 6
    summary = rt.runs.get("u1")
    assert summary is not None and (summary.state, summary.written) == ("done", 5)


class _Png(BaseHTTPRequestHandler):
    body = make_test_image([{"text": "苏E12345", "type": "小型汽车"}])

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "image/png")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def image_host() -> Iterator[str]:
    with http_host(_Png) as url:
        yield url


def test_a_page_that_echoes_a_signed_url_keeps_the_signature_out_of_the_row(
    image_host: str, redis_url: str, key_prefix: str, tmp_path: Path, runtimes: list[Runtime]
) -> None:
    source = f"{image_host}/cam1/0001.png?Signature=topsecret42&security-token=sts77secret&n=1"
    with _serve("html") as server:
        rt = _runtime(server, redis_url, key_prefix, tmp_path)
        runtimes.append(rt)
        result = execute_chunk(Chunk("u2", "0000000", (ImageRef(source),)), rt)
        assert result.calls == _requests(server) == 2
    (row,) = rt.dataset.read_run("u2").to_pylist()
    assert row["error_code"] == CODE
    message = row["error_message"]
    assert "Request blocked" in message  # the page itself, so an operator sees what came back
    assert "topsecret42" not in message and "sts77secret" not in message
