"""The short version of the Redis failover drill (``ops/drills/failover.py``): one master, two
replicas and three Sentinels (``redis-server --sentinel``) on loopback, real worker nodes and the
real producer over ``sentinel://``; the master is SIGKILLed mid-run and comes back later. The run
finishes with every image exactly once and the extra calls within the drill's bound; no password
of the servers or the Sentinels reaches a node's or the producer's log."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.drills import failover

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def drill(tmp_path: Path) -> Iterator[failover.SentinelDrill]:
    # As tests/test_drills.py: 2 processes x 4 calls at 150 ms per call, lease at its minimum.
    d = failover.SentinelDrill(
        tmp_path / "drill", images=600, chunk_size=50, concurrency=4, lease_s=10.0, latency_ms=150,
        down_after_ms=2000,
    )  # fmt: skip
    yield d
    d.close()
    shutil.rmtree(tmp_path / "drill", ignore_errors=True)


def test_the_fleet_follows_a_promotion_mid_run(drill: failover.SentinelDrill) -> None:
    result = failover.failover(drill, nodes=2, timeout_s=200)
    a = result.audit
    assert (a.archive, a.in_output, a.missing, a.duplicated) == (600, 600, 0, 0), result.line()
    assert result.finished and 0 <= a.extra_calls <= result.bound_extra_calls, result.line()
    assert result.notes["producer_rc"] == 0 and result.notes["nodes_exited"] == 0, result.notes
    assert result.notes["unacked_drained_s"] is not None, result.counters
    assert result.notes["verify_rc"] == 0 and result.notes["verify"]["exactly_one"] == 600, result.notes
    assert result.notes["old_master_replica_after_s"] is not None, result.notes
    # down-after 2 s, then the election: promoted and writing again within seconds.
    assert result.promotion_s < 30 and result.recovery_s < 60, result.line()
    logs = [n.log.read_text(errors="replace") for n in drill.nodes] + [drill.producer_log()]
    for text in logs:
        assert failover.SERVERS_PASSWORD not in text and failover.SENTINELS_PASSWORD not in text
