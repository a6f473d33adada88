"""A worker node survives a Redis restart at any moment of its life (issue: nodes holding exactly
one unacknowledged message died of kombu's restore on a collected connection, and exited 0).

Real ``carnumber worker`` nodes, their own AOF Redis, the local API server.
"""

from __future__ import annotations

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
