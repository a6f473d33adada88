"""``carnumber metrics`` against real Redis: a run seeded with RunStore, a stopped fleet, an open
circuit, a half-spent quota, a throttled rate and per-call counters, read back through the
Prometheus exposition text (``--once``) and over HTTP on loopback (the real command, port 0)."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio as aredis
from prometheus_client.parser import text_string_to_metric_families

from carnumber.commands import metrics as metrics_cmd
from tests.helpers.books import answer
from workers.books.runs import STATES, RunStore
from workers.fleet import CircuitBreaker, FleetControl
from workers.keys import Keys, account_tag
from workers.message import Chunk, ImageRef
from workers.metrics import CallCounter
from workers.ratelimit import CallQuota, RateLimiter, RedisBackend
from workers.ratelimit.adapt import Reaction

ROOT = Path(__file__).resolve().parents[1]
KEY_ID = "LTAI-metrics-test"
ACCOUNT = account_tag(KEY_ID)
OTHER = "0theraccount"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, redis_url: str, key_prefix: str) -> dict[str, str]:
    values = {
        "REDIS_URL": redis_url,
        "CARNUMBER_KEY_PREFIX": key_prefix,
        "CARNUMBER_QUEUE": f"{key_prefix}:queue",
        "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
        "CARNUMBER_QUOTA": "5",
        "CARNUMBER_QPS": "10",
    }
    monkeypatch.delenv("CARNUMBER_CONFIG", raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    metrics_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def _seed_fleet(url: str, keys: Keys) -> None:
    ar = aredis.Redis.from_url(url)
    try:
        await FleetControl(ar, keys, ACCOUNT).stop("InvalidAccessKeyId.NotFound", "bad key", "r1")
        breaker = CircuitBreaker(ar, keys, ACCOUNT, window=4, min_calls=2, cooldown_s=60)
        await breaker.record(False)
        await breaker.record(False)
        backend = RedisBackend(ar)
        quota = CallQuota(backend, keys.quota(ACCOUNT), 5, "day")
        for _ in range(3):
            await quota.reserve()
        # Throttles that repeat: the rate is cut and stays about there (0.95, 0.9025, then x 0.9).
        limiter = RateLimiter(backend, keys.rate(ACCOUNT), 10.0, reaction=Reaction(hold_s=0))
        for _ in range(3):
            await limiter.on_throttled()
        # Another account known only by its stop flag is found by scanning the prefix.
        await FleetControl(ar, keys, OTHER).stop("ocrServiceNotOpen", "not open", None)
    finally:
        await ar.aclose()


@pytest.fixture
def seeded(env: dict[str, str], redis_client: redis.Redis, key_prefix: str) -> Keys:
    keys = Keys(key_prefix)
    runs = RunStore(redis_client, keys)
    runs.create("r1", "/archive/night")
    runs.mark_enqueued("r1", "c0", "d0", 200)
    runs.mark_enqueued("r1", "c1", "d1", 100)
    answer(runs, "r1", "c0", 200, failed=12, plates=180)
    runs.touch("r1", calls=230)
    images = tuple(ImageRef("/archive/night/x.jpg", f"img{i}") for i in range(30))
    runs.park(Chunk("r1", "c1", images), "stopped")
    runs.create("r0", "/archive/older")
    runs.mark_enqueued("r0", "c0", "d0", 1)
    answer(runs, "r0", "c0", 1)
    redis_client.rpush(env["CARNUMBER_QUEUE"], "m1", "m2", "m3")
    counter = CallCounter(redis_client, keys, ACCOUNT)
    for code, elapsed in [("ok", 0.2), ("ok", 0.7), ("Throttling.User", 0.05), ("ok", None)]:
        counter(code, elapsed)
    counter.flush()
    asyncio.run(_seed_fleet(env["REDIS_URL"], keys))
    return keys


def test_once_exports_runs_queue_switches_quota_rate_and_calls(
    seeded: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    assert metrics_cmd.main(_args("--once")) == 0
    s = _samples(capsys.readouterr().out)

    assert _value(s, "carnumber_redis_up") == 1
    assert _value(s, "carnumber_queue_depth", queue=f"{seeded.prefix}:queue") == 3
    assert ("carnumber_queue_unacked", frozenset()) in s
    # the run: counters from RunStore, state as a labelled gauge (exactly one 1)
    assert _value(s, "carnumber_run_images_enqueued_total", run_id="r1") == 300
    assert _value(s, "carnumber_run_images_written_total", run_id="r1") == 200
    assert _value(s, "carnumber_run_images_failed_total", run_id="r1") == 12
    assert _value(s, "carnumber_run_plates_total", run_id="r1") == 180
    assert _value(s, "carnumber_run_calls_total", run_id="r1") == 230
    assert _value(s, "carnumber_run_images_parked", run_id="r1") == 30
    assert _value(s, "carnumber_run_images_outstanding", run_id="r1") == 70
    assert _value(s, "carnumber_run_state", run_id="r1", state="stopped") == 1
    r1_states = {k: v for k, v in s.items() if k[0] == "carnumber_run_state" and ("run_id", "r1") in k[1]}
    assert sum(r1_states.values()) == 1 and len(r1_states) == len(STATES)
    assert _value(s, "carnumber_run_state", run_id="r0", state="done") == 1
    # the account's switches, quota and rate
    assert _value(s, "carnumber_fleet_stopped", account=ACCOUNT, code="InvalidAccessKeyId.NotFound") == 1
    assert _value(s, "carnumber_fleet_stopped", account=OTHER, code="ocrServiceNotOpen") == 1
    assert _value(s, "carnumber_circuit_state", account=ACCOUNT, state="open") == 1
    assert _value(s, "carnumber_circuit_state", account=ACCOUNT, state="closed") == 0
    assert _value(s, "carnumber_circuit_opens_total", account=ACCOUNT) == 1
    assert _value(s, "carnumber_quota_limit", account=ACCOUNT, window="day") == 5
    assert _value(s, "carnumber_quota_used", account=ACCOUNT, window="day") == 3
    assert _value(s, "carnumber_quota_remaining", account=ACCOUNT, window="day") == 2
    assert _value(s, "carnumber_rate_limit_factor", account=ACCOUNT) == pytest.approx(0.812, abs=0.01)
    assert _value(s, "carnumber_rate_limit_qps", account=ACCOUNT) == 10
    # per-call counters from the worker hook
    assert _value(s, "carnumber_api_calls_total", account=ACCOUNT, code="ok") == 3
    assert _value(s, "carnumber_api_calls_total", account=ACCOUNT, code="Throttling.User") == 1
    assert _value(s, "carnumber_api_call_latency_seconds_count", account=ACCOUNT) == 3
    assert _value(s, "carnumber_api_call_latency_seconds_sum", account=ACCOUNT) == pytest.approx(0.95)
    assert _value(s, "carnumber_api_call_latency_seconds_bucket", account=ACCOUNT, le="0.25") == 2
    assert _value(s, "carnumber_api_call_latency_seconds_bucket", account=ACCOUNT, le="+Inf") == 3


def test_with_a_price_each_run_has_its_cost_and_the_price_is_exported(
    seeded: Keys, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CARNUMBER_PRICE_PER_1000_CALLS", "1.5")
    assert metrics_cmd.main(_args("--once")) == 0
    text = capsys.readouterr().out
    s = _samples(text)

    assert _value(s, "carnumber_price_per_1000_calls") == 1.5
    assert _value(s, "carnumber_run_calls_total", run_id="r1") == 230
    assert _value(s, "carnumber_run_cost_total", run_id="r1") == pytest.approx(230 * 1.5 / 1000)
    assert _value(s, "carnumber_run_cost_total", run_id="r0") == 0  # a run with no calls costs nothing
    assert "# TYPE carnumber_run_cost_total counter" in text
    assert "# TYPE carnumber_price_per_1000_calls gauge" in text


def test_without_a_price_neither_price_nor_cost_is_exported(
    seeded: Keys, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CARNUMBER_PRICE_PER_1000_CALLS", raising=False)
    assert metrics_cmd.main(_args("--once")) == 0
    s = _samples(capsys.readouterr().out)

    assert _value(s, "carnumber_run_calls_total", run_id="r1") == 230
    names = {name for name, _ in s}
    assert "carnumber_price_per_1000_calls" not in names
    assert not any(name.startswith("carnumber_run_cost") for name in names)


def test_exporter_only_reads(
    seeded: Keys, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    def dump() -> dict[bytes, object]:
        out: dict[bytes, object] = {}
        for key in sorted(redis_client.scan_iter(f"{seeded.prefix}*")):
            kind = redis_client.type(key)
            out[key] = (kind, redis_client.dump(key), redis_client.pttl(key) > 0)
        return out

    before = dump()
    assert metrics_cmd.main(_args("--once")) == 0
    capsys.readouterr()
    assert dump() == before


def test_redis_down_answers_with_redis_up_zero(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{_free_port()}/0")
    assert metrics_cmd.main(_args("--once")) == 1
    s = _samples(capsys.readouterr().out)
    assert _value(s, "carnumber_redis_up") == 0
    assert not any(name.startswith("carnumber_run_") for name, _ in s)


@pytest.fixture
def exporter(seeded: Keys, env: dict[str, str]) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "carnumber.cli", "metrics", "--port", "0", "--addr", "127.0.0.1"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "serving http://127.0.0.1:" in line, line
        yield line.rsplit(" ", 1)[-1].strip()
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


def test_http_scrape_reads_redis_each_time(exporter: str, seeded: Keys, redis_client: redis.Redis) -> None:
    with httpx.Client(timeout=10) as http:
        first = _samples(http.get(exporter).raise_for_status().text)
        assert _value(first, "carnumber_run_images_written_total", run_id="r1") == 200
        answer(RunStore(redis_client, seeded), "r1", "c1", 70, plates=60)
        second = _samples(http.get(exporter).raise_for_status().text)
    assert _value(second, "carnumber_run_images_written_total", run_id="r1") == 270
    assert _value(second, "carnumber_run_images_outstanding", run_id="r1") == 0
