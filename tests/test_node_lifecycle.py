"""A worker node's life with real ``carnumber worker`` nodes, their own AOF Redis and the local
API server: it survives a Redis restart at any moment (nodes holding exactly one unacknowledged
message died of kombu's restore on a collected connection, and exited 0); SIGTERM hands back what
it has not called at once and exits 0; an unrecoverable error exits non-zero within seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.drills.harness import Drill, audit

pytestmark = pytest.mark.slow


@pytest.fixture
def drill(tmp_path: Path) -> Iterator[Drill]:
    d = Drill(tmp_path / "drill", images=100, chunk_size=100, concurrency=2, lease_s=10.0, latency_ms=150,
              log_level="INFO")  # fmt: skip
    yield d
    d.close()


def _wait(cond: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.25)
    return False


def test_nodes_holding_one_message_or_none_ride_out_a_redis_restart(drill: Drill) -> None:
    holder = drill.start_node()  # two pool threads: holding one chunk, it waits in BRPOP for more
    assert _wait(
        lambda: drill.client.llen(drill.env()["CARNUMBER_QUEUE"]) == 0 and "ready" in holder.tail(), 60
    )
    assert drill.enqueue().returncode == 0
    assert _wait(lambda: drill.client.hlen("unacked") == 1, 20), "the node did not take the chunk"
    idle = drill.start_node()  # joins mid-run, holds nothing
    assert _wait(lambda: "ready" in idle.tail(), 60)
    drill.redis.stop()
    time.sleep(3)
    drill.redis.start()

    drill.wait_for("the run after the restart", drill.finished, 90)
    assert holder.alive(), holder.tail()
    assert idle.alive(), idle.tail()
    assert "Unrecoverable" not in holder.tail(200) + idle.tail(200)
    # Both still consume: a second run goes through.
    drill.run_id = "after-restart"
    assert drill.enqueue().returncode == 0
    drill.wait_for("a run after the restart", drill.finished, 60)
    drill.run_id = "drill"
    result = audit(drill)
    assert (result.missing, result.duplicated) == (0, 0)
    # Held across the restart, not handed back: the chunk was not run twice (the second run's
    # pictures were answered by the first, from the answer cache).
    assert result.calls == 100


def test_sigterm_hands_back_what_the_node_has_not_called_and_exits_0(drill: Drill) -> None:
    drill.images = 100
    leaving = drill.start_node()
    assert _wait(lambda: "ready" in leaving.tail(), 60)
    assert drill.enqueue().returncode == 0
    assert _wait(lambda: drill.server_calls() >= 10, 30)
    stopped_at = time.monotonic()
    os.killpg(leaving.proc.pid, signal.SIGTERM)  # a rolling restart
    assert leaving.proc.wait(30) == 0
    assert time.monotonic() - stopped_at < 10  # the calls in flight, not the rest of the chunk
    assert "handed back" in leaving.tail(100)
    # Back in the queue at once, not after the lease: the next node starts on it.
    assert drill.client.llen(drill.env()["CARNUMBER_QUEUE"]) == 1 and drill.client.hlen("unacked") == 0
    drill.start_node()
    drill.wait_for("the run on the next node", drill.finished, 60)
    result = audit(drill)
    assert (result.missing, result.duplicated, result.calls) == (0, 0, 100)


# A bootstep that fails the way kombu's restore on a collected connection did: Celery calls it an
# unrecoverable error and stops the worker.
_UNRECOVERABLE = """
import sys
from celery import bootsteps
from workers.celery import app

class Broken(bootsteps.StartStopStep):
    requires = ("celery.worker.consumer.tasks:Tasks",)
    def start(self, parent):
        raise AttributeError("'NoneType' object has no attribute 'hostname'")

app.steps["consumer"].add(Broken)
from carnumber.cli import main
sys.exit(main(["worker", "-l", "INFO", "-n", "broken@%h"]))
"""


def test_an_unrecoverable_error_exits_non_zero_within_seconds(drill: Drill) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _UNRECOVERABLE], env=drill.env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Unrecoverable error" in done.stdout + done.stderr
    assert time.monotonic() - started < 30
