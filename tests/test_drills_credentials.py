"""Short version of ops/drills/credentials.py: real ``carnumber worker`` nodes with no AccessKey,
only a credentials URI on loopback (the local server's STS) handing out short-lived tokens."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ops.drills import credentials

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_tokens_that_expire_every_few_seconds_cost_nothing(tmp_path: Path) -> None:
    # 320 images at Q = 20 (about 16 s) on 4 s tokens: each node renews them every 2 s or so.
    d = credentials.rotating_drill(tmp_path / "rotate", images=320, qps=20, token_s=4)
    try:
        result = credentials.rotate(d, nodes=2, timeout_s=240)
    finally:
        d.close()
        shutil.rmtree(tmp_path / "rotate", ignore_errors=True)
    a = result.audit
    assert (a.archive, a.in_output, a.missing, a.duplicated) == (320, 320, 0, 0), result.line()
    assert (result.failed, result.stops, result.expired_answers, result.leaked) == (0, 0, 0, 0), result.line()
    assert result.tokens_issued >= 8 and a.calls == 320, result.line()


def test_a_revoked_token_still_stops_the_fleet_and_resume_finishes(tmp_path: Path) -> None:
    d = credentials.rotating_drill(tmp_path / "revoke", images=300, qps=20, token_s=60)
    try:
        result = credentials.revoke(d, nodes=2, timeout_s=240)
    finally:
        d.close()
        shutil.rmtree(tmp_path / "revoke", ignore_errors=True)
    a = result.audit
    assert (result.stop_code, result.notes["failed_at_stop"]) == ("invalidStsToken", 0), result.line()
    assert result.notes["stop_s"] < 15, result.line()
    counts = (a.in_output, a.missing, a.duplicated, result.failed, result.leaked)
    assert counts == (300, 0, 0, 0, 0), result.line()
