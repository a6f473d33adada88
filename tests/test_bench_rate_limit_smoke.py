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
    CaseResult,
    RecordingStats,
    Spread,
    count_in,
    gap_stats,
    markdown_table,
    max_per_whole_second,
    max_sliding,
    spread_table,
)
from ratelimit_trace import crowding_per_min  # noqa: E402

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


def test_crowding_replays_a_runs_delays_under_other_guards() -> None:
    """What a pacing guard would have let through, on delays a trace recorded: a constant delay
    crowds nothing (every call moves alike); delays that vary by more than the guard do."""

    def records(delays: list[float]) -> list[dict[str, float]]:
        return [{"slot": k * 0.1, "arrived": k * 0.1 + d} for k, d in enumerate(delays)]

    assert crowding_per_min(records([0.0] * 600), 10, 0.0) == 0
    assert crowding_per_min(records([0.03] * 600), 10, 0.01) == 0
    varied = records([0.03 if k % 7 == 0 else 0.0 for k in range(600)])
    assert crowding_per_min(varied, 10, 0.01) > 1
    assert crowding_per_min(varied, 10, 0.04) == 0


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
    args = rate_limit.parse_args([])
    assert args.repeat == 10 and args.seconds == 60
    cases = rate_limit.build_cases(args)
    assert [c.name.split(":")[0] for c in cases] == ["a", "b", "c", "d", "e"]
    a, b, c, d, e = cases
    assert [(x.qps, x.limit, x.latency_ms) for x in cases] == [
        (10, 10, 0), (50, 50, 500), (50, 50, 500), (10, 8, 0), (100, 100, 200),
    ]
    assert c.throttle_random == 0.002 and all(x.throttle_random == 0 for x in (a, b, d, e))
    assert d.warmup_s == 30 and a.warmup_s == 5  # case d counts from 30 s after the first call
    for case in cases:  # four `carnumber worker` nodes as they come, on two host names
        assert [n for n, _ in case.nodes] == list(rate_limit.FLEET) and case.pool == "default"
        assert len({n.split("@")[1] for n, _ in case.nodes}) == 2
        assert case.images >= case.qps * (case.warmup_s + case.seconds)
    assert Settings().concurrency * 4 >= 100 * 0.2 * 1.5  # Little's law for case e, with room
    picked = rate_limit.build_cases(rate_limit.parse_args(["--case", "d,a,celery10", "--repeat", "2"]))
    assert [x.name.split(":")[0] for x in picked] == ["d", "a", "celery10"]
    assert picked[2].mode == "celery" and picked[2].chunk_size == 1  # Celery counts messages
    with pytest.raises(SystemExit):
        rate_limit.build_cases(rate_limit.parse_args(["--case", "f"]))


def test_the_spread_table_gives_min_median_max_and_throttles_per_run() -> None:
    def result(fraction: float, throttled: int, random_refusals: int = 0) -> CaseResult:
        return CaseResult(
            mode="b", qps=50, limit=50, achieved_per_s=50 * fraction, sent_per_s=50.0,
            throttled=throttled, max_accepted=50, max_sent=51, max_sent_sliding=51, duration_s=60,
            gaps=gap_stats([], 0.02), requests=3000, random_refusals=random_refusals,
        )

    runs = [result(0.99, 0), result(0.985, 1), result(0.991, 0), result(0.98, 7, 6)]
    table = spread_table([Spread("b: Q = 50", runs, [(0.5, 0.7), (0.7, 1.2)] * 2)])
    row = table.splitlines()[2]
    assert "| b: Q = 50 | 4 | 98.0% / 98.8% / 99.1% |" in row
    assert "| 0, 1, 0, 7 (6 at random) | 2 of 4 |" in row
    assert "max 0.23% /" in row and "| 51 (limit 50) | 0.50–1.20 |" in row


@pytest.mark.timeout(60)
def test_tiny_fleet_case_measures_sane_numbers(redis_url: str, tmp_path: Path) -> None:
    qps = 10
    case = Case(
        mode="limiter", qps=qps, seconds=2.0, warmup_s=1.0,
        nodes=(("smoke-1@hostA", 1), ("smoke-2@hostB", 1)),
        concurrency=4, chunk_size=5, images=60, throttle_random=0.05,
    )
    make_archive(tmp_path / "archive", case.images, distinct=5)
    result = run_case(case, tmp_path / "archive", redis_url, tmp_path / "work", log=False, trace=True)
    # Two nodes, one account, one limit: calls flowed, and never faster than the limit allows.
    assert 0.3 * qps <= result.achieved_per_s <= qps + 1 / case.seconds
    assert result.max_accepted <= qps  # the server's own cap
    assert result.duration_s == 2.0 and result.sent_per_s >= result.achieved_per_s
    # Every call sent is counted once: accepted, or throttled (at random or by the limit).
    assert result.requests >= result.throttled >= result.random_refusals
    assert result.limit == qps and result.throttled_share <= 0.5
    trace = result.trace
    assert trace is not None and trace.calls >= 15
    # The schedule the workers got from Redis: slots at least 1/Q apart, so never more than Q in
    # any one second of the schedule, whatever the delivery jitter did afterwards.
    assert trace.slot_gap_min_ms >= 1000 / qps - 0.001
    assert trace.slots_max_1s <= qps
    assert 0 <= trace.delivery_p50_ms < 1000 and trace.wake_p50_ms >= 0
    assert "| limiter | 10 |" in markdown_table([result])
    assert [g for g, _ in trace.crowding] == [5.0, 10.0, 15.0, 20.0]
