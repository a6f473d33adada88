"""The dedup benchmark (``ops/bench/dedup.py``, "never pay twice for the same picture") at small
size, run as the script it is: its own Redis, the local server, two real ``carnumber worker``
nodes, the real ``enqueue`` / ``verify`` / ``compact`` commands. Its JSON must say both
measurements are met: one call per distinct picture in the first run, none in the second."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "ops" / "bench" / "dedup.py"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_dedup_bench_meets_both_measurements_at_small_size() -> None:
    # 200 images (170 distinct, 30 copies) in chunks of 25: copies in other chunks and sources.
    done = subprocess.run(
        [sys.executable, str(BENCH), "--images", "200", "--chunk-size", "25", "--json"],
        capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(done.stdout)
    copies, moved = doc["measurements"]
    assert doc["met"] and copies["met"] and moved["met"], (copies["failed"], moved["failed"])
    one, two = copies["figures"], moved["figures"]
    assert (one["calls"], one["answered_by_other"], one["images_with_one_outcome"]) == (170, 30, 200)
    assert (two["calls"], two["from_cache"], two["images_with_one_outcome"]) == (0, 200, 200)
    assert two["cache_update_s"] >= 0 and two["images_per_s"] > 0
