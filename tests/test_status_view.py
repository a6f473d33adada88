"""``carnumber status`` against real Redis: the figures of a seeded run (progress, calls per second
from the workers' per-minute counters, throttles, quota, estimated finish against the deadline,
fleet state, cost), the plain line, the JSON object scripts read, ``--follow``'s exit codes, the
run list, and the rich panel rendered to text."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import threading
import time

import pytest
import redis
import redis.asyncio as aredis
from rich.console import Console

from carnumber.commands import status as status_cmd
from carnumber.monitor import Monitor
from carnumber.runview import RunView, Sampler, WorkerInfo, parse_deadline
from carnumber.statusview import duration, plain_line, render, summary
from tests.helpers.books import answer
from workers.books.runs import RunStore
from workers.config import Settings
from workers.errors import ConfigError
from workers.fleet import FleetControl
from workers.keys import Keys, account_tag
from workers.message import Chunk, ImageRef
from workers.metrics import CallCounter

KEY_ID = "LTAI-status-test"
ACCOUNT = account_tag(KEY_ID)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, redis_url: str, key_prefix: str) -> dict[str, str]:
    values = {
        "REDIS_URL": redis_url,
        "CARNUMBER_KEY_PREFIX": key_prefix,
        "CARNUMBER_QUEUE": f"{key_prefix}:queue",
        "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
        "CARNUMBER_QUOTA": "1000",
        "CARNUMBER_QPS": "10",
        "CARNUMBER_PRICE_PER_1000_CALLS": "2.0",
    }
    monkeypatch.delenv("CARNUMBER_CONFIG", raising=False)
    monkeypatch.delenv("CARNUMBER_RUN_DEADLINE", raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def store(redis_client: redis.Redis, key_prefix: str) -> RunStore:
    return RunStore(redis_client, Keys(key_prefix))


def _seed(store: RunStore, redis_client: redis.Redis, key_prefix: str) -> None:
    store.create("r1", "/data/cams")
    redis_client.hset(Keys(key_prefix).run("r1"), "created_at", time.time() - 120)  # older than a minute
    store.mark_enqueued("r1", "c0", "d0", 200)
    store.mark_enqueued("r1", "c1", "d1", 100)
    answer(store, "r1", "c0", 100, failed=4, plates=90)
    store.touch("r1", calls=120, deadline="2099-01-01T06:00:00+00:00")  # 1.2 calls per image
    counter = CallCounter(redis_client, Keys(key_prefix), ACCOUNT)
    for _ in range(57):
        counter.record("ok", 0.2)
    for _ in range(3):
        counter.record("Throttling.User", 0.05)
    counter.flush()


def _view(env: dict[str, str], client: redis.Redis, **kw: object) -> RunView:
    settings = Settings.from_env(env)
    url = settings.broker_url
    monitor = Monitor(settings, client, lambda: aredis.Redis.from_url(url))
    return RunView(settings, client, monitor, **kw)  # type: ignore[arg-type]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    status_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_parse_deadline_forms() -> None:
    created = dt.datetime(2026, 11, 24, 1, 0, tzinfo=dt.UTC).timestamp()
    six = dt.datetime(2026, 11, 24, 6, 0, tzinfo=dt.UTC).timestamp()
    assert parse_deadline("06:00", created) == six
    assert parse_deadline("00:30", created) == six + 18.5 * 3600  # the next day's 00:30
    assert parse_deadline("2026-11-24T06:00", created) == six
    assert parse_deadline("2026-11-24T14:00+08:00", created) == six
    assert parse_deadline(str(six), created) == six
    with pytest.raises(ConfigError):
        parse_deadline("tomorrow", created)


def test_sampler_rates_need_a_span() -> None:
    s = Sampler()
    s.add(0.0, 100, 10)
    assert s.rate(10, 1, min_span_s=3) is None
    s.add(2.0, 120, 12)
    s.add(12.0, 220, 30)
    assert s.rate(10, 1, min_span_s=3) == pytest.approx(10.0)  # (220-120)/10
    assert s.rate(60, 2, min_span_s=10) == pytest.approx(20 / 12)


def test_figures_of_a_running_run(
    env: dict[str, str], store: RunStore, redis_client: redis.Redis, key_prefix: str
) -> None:
    _seed(store, redis_client, key_prefix)
    now = [time.time()]
    mono = [0.0]
    view = _view(
        env,
        redis_client,
        workers=lambda run: WorkerInfo(("w1@h",), 1, 100),
        clock=lambda: now[0],
        monotonic=lambda: mono[0],
    )
    summary_ = store.get("r1")
    assert summary_ is not None
    f = view.figures(summary_)
    assert (f.enqueued, f.written, f.failed, f.pending, f.parked, f.plates, f.calls) == (
        300,
        100,
        4,
        200,
        0,
        90,
        120,
    )
    assert f.progress == pytest.approx(1 / 3)
    assert f.fleet == "running" and f.circuit == "closed"
    # 60 calls in the current minute (a little less if the seeding crossed a minute boundary)
    assert f.calls_per_s_1m == pytest.approx(1.0, abs=0.25)
    assert f.throttled_1m == 3
    assert f.calls_per_s_10s is None  # one reading
    assert f.qps_limit == 10
    assert (f.quota_limit, f.quota_left, f.quota_window) == (1000, 1000, "day")
    assert f.eta_basis == "calls" and f.images_per_s == pytest.approx(f.calls_per_s_1m / 1.2)
    assert f.eta_s == pytest.approx(200 / f.images_per_s)
    assert f.deadline_at_s == dt.datetime(2099, 1, 1, 6, tzinfo=dt.UTC).timestamp() and f.on_time
    assert f.workers == ("w1@h",) and f.images_running == 100
    assert f.cost == pytest.approx(0.24) and f.cost_projected == pytest.approx(0.72)

    # A second reading 12 s later with more calls and images: the watcher's own rates.
    counter = CallCounter(redis_client, Keys(key_prefix), ACCOUNT)
    for _ in range(60):
        counter.record("ok", 0.2)
    counter.flush()
    answer(store, "r1", "c1", 50, plates=50)
    redis_client.hincrby(Keys(key_prefix).run("r1"), "calls", 60)
    mono[0] = 12.0
    summary_ = store.get("r1")
    assert summary_ is not None
    g = view.figures(summary_)
    assert g.calls_per_s_10s == pytest.approx(60 / 12)
    assert g.eta_basis == "watch" and g.images_per_s == pytest.approx(50 / 12)
    line = plain_line(g)
    assert line.startswith("r1: running 150/300 images (50.0%), failed=4")
    assert "calls/s=5.0/10s" in line and "limit=10" in line and "on_time=yes" in line


def test_fleet_state_shows_a_stop_with_its_code(
    env: dict[str, str], store: RunStore, redis_client: redis.Redis, key_prefix: str, redis_url: str
) -> None:
    _seed(store, redis_client, key_prefix)

    async def stop() -> None:
        ar = aredis.Redis.from_url(redis_url)
        try:
            await FleetControl(ar, Keys(key_prefix), ACCOUNT).stop("OcrServiceExpired", "pay up", "r1")
        finally:
            await ar.aclose()

    asyncio.run(stop())
    summary_ = store.get("r1")
    assert summary_ is not None
    f = _view(env, redis_client).figures(summary_)
    assert f.fleet == "stopped (OcrServiceExpired)" and f.stop_message == "pay up"
    assert f.workers is None


def test_cli_json_plain_and_list(
    env: dict[str, str],
    store: RunStore,
    redis_client: redis.Redis,
    key_prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _seed(store, redis_client, key_prefix)
    assert status_cmd.main(_args("r1", "--json", "--no-workers")) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    # scripts (ops/nightly.sh) read these two; one "state" line only
    assert data["state"] == "running" and data["source"] == "/data/cams"
    assert sum(1 for ln in out.splitlines() if ln.strip().startswith('"state":')) == 1
    assert data["images_enqueued"] == "300" and data["pending"] == 200 and data["cost"] == pytest.approx(0.24)
    assert status_cmd.main(_args("r1", "--no-workers")) == 0
    assert capsys.readouterr().out.startswith("r1: running 100/300 images (33.3%)")
    store.create("r2", "/data/other")
    assert status_cmd.main(_args()) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("r2: enqueuing 0/0") and lines[1].startswith("r1: running 100/300")
    assert "age=" in lines[1]


def test_follow_exits_with_how_the_run_ended(
    env: dict[str, str],
    store: RunStore,
    redis_client: redis.Redis,
    key_prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _seed(store, redis_client, key_prefix)

    def finish() -> None:
        time.sleep(0.5)
        answer(store, "r1", "c0", 100, plates=100, start=100)
        answer(store, "r1", "c1", 100, plates=100)

    t = threading.Thread(target=finish)
    t.start()
    assert status_cmd.main(_args("r1", "--follow", "--interval-s", "0.2", "--no-workers")) == 0
    t.join()
    out = capsys.readouterr().out
    assert "run r1 finished: 300/300 images with an outcome" in out

    store.create("q", "/data/q")
    store.mark_enqueued("q", "c0", "d0", 10)
    store.park(Chunk("q", "c0", (ImageRef("/data/q/a.jpg"),)), "quota_exhausted")
    assert status_cmd.main(_args("q", "--follow", "--no-workers")) == 3
    assert "call quota spent" in capsys.readouterr().out
    store.park(Chunk("q", "c0", (ImageRef("/data/q/a.jpg"),)), "redis_unavailable")
    assert status_cmd.main(_args("q", "--follow", "--no-workers")) == 3
    assert "Redis was out of reach" in capsys.readouterr().out

    store.create("slow", "/data/s")
    store.mark_enqueued("slow", "c0", "d0", 10)
    assert (
        status_cmd.main(
            _args("slow", "--follow", "--interval-s", "0.1", "--timeout-s", "0.3", "--no-workers")
        )
        == 4
    )


def test_rich_panel_renders(
    env: dict[str, str], store: RunStore, redis_client: redis.Redis, key_prefix: str
) -> None:
    _seed(store, redis_client, key_prefix)
    summary_ = store.get("r1")
    assert summary_ is not None
    f = _view(env, redis_client, workers=lambda run: WorkerInfo(("w1@h", "w2@h"), 2, 40)).figures(summary_)
    console = Console(width=120, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(render(f))
    text = console.export_text()
    console.file.close()
    for want in (
        "run r1",
        "100/300 images (33.3%)",
        "limit 10",
        "throttled last min: 3",
        "1000 left",
        "before the deadline 2099-01-01 06:00Z",
        "2 alive (w1@h, w2@h)",
        "0.24 so far",
    ):
        assert want in text, want
    assert "finished" in summary(f, 5.0) or "running" in summary(f, 5.0)
    assert duration(3725) == "1h02m" and duration(None) == "-"


def test_rate_of_a_run_younger_than_a_minute(
    env: dict[str, str], store: RunStore, redis_client: redis.Redis, key_prefix: str
) -> None:
    minute = (time.time() // 60) * 60
    now = minute + 30  # 30 s into a minute; the run began 10 s ago and made 50 calls since
    store.create("young", "/data/y")
    redis_client.hset(Keys(key_prefix).run("young"), "created_at", now - 10)
    counter = CallCounter(redis_client, Keys(key_prefix), ACCOUNT, clock=lambda: now - 5)
    for _ in range(50):
        counter.record("ok", 0.1)
    counter.flush()
    summary_ = store.get("young")
    assert summary_ is not None
    f = _view(env, redis_client, clock=lambda: now).figures(summary_)
    assert f.calls_per_s_1m == pytest.approx(5.0)  # 50 calls over its 10 s, not over 60 s
