"""Short versions of the infrastructure fault drills (``ops/drills/faults.py``), with real worker
nodes (``carnumber worker`` process groups), the drills' own Redis with AOF, the local server
on loopback and the real producer command. Each asserts every image exactly once in the output
and the extra calls within the bound the design states (the calls in flight at the fault)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.drills import faults
from ops.drills.harness import Drill

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def drill(tmp_path: Path) -> Iterator[Drill]:
    # 2 processes x 4 calls at 150 ms per call: slow enough to hit mid-run, lease at its minimum.
    d = Drill(tmp_path / "drill", images=900, chunk_size=50, concurrency=4, lease_s=10.0, latency_ms=150)
    yield d
    d.close()
    shutil.rmtree(tmp_path / "drill", ignore_errors=True)


def _assert_exact(result: faults.Result) -> None:
    a = result.audit
    assert (a.archive, a.in_output, a.missing, a.duplicated) == (900, 900, 0, 0), result.line()
    assert 0 <= a.extra_calls <= result.bound_extra_calls, result.line()


def test_a_killed_node_s_chunks_run_elsewhere_within_the_lease(drill: Drill) -> None:
    result = faults.kill_node(drill, kills=1, nodes=2, timeout_s=240)
    _assert_exact(result)
    # Lease 10 s, sweeps every 5 s, renewals every 2.5 s: back well within a minute.
    assert result.recovery_s[0] < 30, result.line()


def test_a_redis_restart_is_ridden_out(drill: Drill) -> None:
    result = faults.redis_restart(drill, down_s=8, timeout_s=240)
    _assert_exact(result)
    assert result.notes["producer_rc"] == 0, result.notes


def test_a_killed_producer_is_run_again(drill: Drill) -> None:
    result = faults.producer_kill(drill, timeout_s=240)
    _assert_exact(result)
