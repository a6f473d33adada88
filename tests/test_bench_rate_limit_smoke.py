"""The rate-limit benchmark's machinery at tiny scale (ops/bench/rate_limit.py and its helpers).

Pure measures on known timestamps; the recording server counters against a real server on
loopback; and one real case: two Celery worker nodes through the global limiter for a few
seconds, checking that the numbers are sane and that the limiter's own schedule (traced inside the
workers) never put two slots closer than 1/Q.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx
import pytest

BENCH = Path(__file__).resolve().parents[1] / "ops" / "bench"
sys.path.insert(0, str(BENCH))

import rate_limit  # noqa: E402
from ratelimit_fleet import Case, make_archive, run_case  # noqa: E402
from ratelimit_measure import (  # noqa: E402
    RecordingStats,
    count_in,
    gap_stats,
    markdown_table,
    max_per_whole_second,
    max_sliding,
)

from ocrserver.config import ServerConfig  # noqa: E402
from ocrserver.server import start_server  # noqa: E402
from ocrserver.truth import make_test_image  # noqa: E402
from workers.api.client import AsyncClient, Image  # noqa: E402
from workers.config import Credentials, Settings  # noqa: E402
from workers.errors import RetryableApiError  # noqa: E402


def test_window_measures_on_known_times() -> None:
    # 9 calls 1/8 s apart (exact in binary) from 100.875: whole seconds hold 1 and 8, and so does
    # any half-open sliding second; one more call 1 ms after the last crowds a second to 9.
    times = [100.875 + k / 8 for k in range(9)]
    assert max_per_whole_second(times) == 8
    assert max_sliding(times) == 8
    assert max_sliding([*times, times[-1] + 0.001]) == 9
    assert max_per_whole_second([*times, times[-1] + 0.001]) == 9
    assert count_in(times, 101.0, 102.0) == 8
    assert count_in(times, 0, 1e12) == 9
    gaps = gap_stats([0.0, 0.1, 0.2, 0.5, 0.6], interval_s=0.1)
    assert gaps.long_gaps == 1 and gaps.lost_s == pytest.approx(0.2)
    assert gaps.max_s == pytest.approx(0.3) and gaps.p50_s == pytest.approx(0.1)
    assert max_sliding([]) == 0 and max_per_whole_second([]) == 0


def test_recording_stats_see_every_accepted_and_throttled_call() -> None:
    server = start_server(ServerConfig(keys="smokeid:smokesecret", qps=2))
    stats = RecordingStats()
    server.app.stats = stats  # type: ignore[assignment]
    try:

        async def burst() -> list[bool]:
            async with httpx.AsyncClient() as http:
                client = AsyncClient(server.url, Credentials("smokeid", "smokesecret"), http)
                body = make_test_image(["浙A12345"])
                outcomes = []
                for _ in range(3):
                    try:
                        await client.recognize(Image(body=body))
                        outcomes.append(True)
                    except RetryableApiError as exc:
                        assert exc.code == "Throttling.User"
                        outcomes.append(False)
                return outcomes

        outcomes = asyncio.run(burst())
        served = httpx.get(f"{server.url}/__carnumber/stats").json()
    finally:
        server.stop()
    requests, accepted, throttled = stats.snapshot()
    assert len(requests) == 3
    # Three calls within one whole second get 2 + 1 refusal; across a boundary, 3 + 0.
    assert len(accepted) == outcomes.count(True) == served["accepted_total"]
    assert len(throttled) == outcomes.count(False) == served["throttled"]
    assert sorted(accepted) == accepted and all(requests[0] <= t for t in accepted + throttled)


def test_default_invocation_builds_the_issue_cases() -> None:
    cases = rate_limit.build_cases(rate_limit.parse_args([]))
    assert [(c.name, c.qps) for c in cases] == [
        ("limiter", 10), ("celery rate_limit", 10), ("limiter", 50), ("celery rate_limit", 50),
        ("limiter, 500 ms latency, 1 node, default pool", 50),
    ]
    fleet = cases[0].nodes
    assert [n for n, _ in fleet] == list(rate_limit.FLEET) and len({n.split("@")[1] for n, _ in fleet}) == 2
    assert all(c.images >= c.qps * 70 for c in cases)
    assert cases[1].chunk_size == 1  # Celery's rate_limit counts messages
    latency = cases[-1]
    assert len(latency.nodes) == 1 and latency.latency_ms == 500
    # `carnumber worker` as it comes: its default pool and call slots alone must carry Q.
    assert latency.pool == "default"
    assert Settings().concurrency >= 50 * 0.5  # Little's law: Q x latency in flight


@pytest.mark.timeout(60)
def test_tiny_fleet_case_measures_sane_numbers(redis_url: str, tmp_path: Path) -> None:
    qps = 10
    case = Case(
        mode="limiter", qps=qps, seconds=2.0, warmup_s=1.0,
        nodes=(("smoke-1@hostA", 1), ("smoke-2@hostB", 1)),
        concurrency=4, chunk_size=5, images=60,
    )
    make_archive(tmp_path / "archive", case.images, distinct=5)
    result = run_case(case, tmp_path / "archive", redis_url, tmp_path / "work", log=False, trace=True)
    # Two nodes, one account, one limit: calls flowed, and never faster than the limit allows.
    assert 0.3 * qps <= result.achieved_per_s <= qps + 1 / case.seconds
    assert result.max_accepted <= qps  # the server's own cap
    assert result.duration_s == 2.0 and result.sent_per_s >= result.achieved_per_s
    trace = result.trace
    assert trace is not None and trace.calls >= 15
    # The schedule the workers got from Redis: slots at least 1/Q apart, so never more than Q in
    # any one second of the schedule, whatever the delivery jitter did afterwards.
    assert trace.slot_gap_min_ms >= 1000 / qps - 0.001
    assert trace.slots_max_1s <= qps
    assert 0 <= trace.delivery_p50_ms < 1000 and trace.wake_p50_ms >= 0
    assert "| limiter | 10 |" in markdown_table([result])
