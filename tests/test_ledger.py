"""The incremental ledger over real Parquet parts written by the sink (and compacted by it)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from producers.ledger import Ledger, keys_of
from workers.message import ImageRef
from workers.sink.compact import compact_run
from workers.sink.dataset import open_dataset


def rows(run_id: str, refs: list[ImageRef], status: str) -> list[dict[str, Any]]:
    return [
        {
            "run_id": run_id,
            "image_id": r.image_id,
            "source": r.source,
            "status": status,
            "attempts": 1,
            "processed_at": datetime.now(UTC),
        }
        for r in refs
    ]


def images(n: int, tag: str = "img") -> list[ImageRef]:
    return [ImageRef(f"file:///data/{tag}/{i:06d}.jpg") for i in range(n)]


def ids(refs: list[ImageRef]) -> list[str]:
    return [r.image_id for r in refs]


def test_no_output_yet_means_nothing_answered(tmp_path: Path) -> None:
    ledger = Ledger.open(str(tmp_path / "absent"))
    assert ledger.answered(ids(images(5))) == set()
    assert not (tmp_path / "absent").exists()  # opening does not create the output


def test_ok_and_no_plate_are_answered_failed_is_not(tmp_path: Path) -> None:
    refs = images(300)
    ds = open_dataset(str(tmp_path))
    ds.write_part("r1", "part-0000000-a", rows("r1", refs[:100], "ok"))
    ds.write_part("r1", "part-0000001-b", rows("r1", refs[100:200], "no_plate"))
    ds.write_part("r1", "part-0000002-c", rows("r1", refs[200:], "failed"))
    ledger = Ledger.open(str(tmp_path))
    assert ledger.answered(ids(refs)) == set(ids(refs[:200]))
    assert ledger.stats.files_ingested == 3 and ledger.stats.entries == 200
    assert (tmp_path / "_ledger" / "v1" / "keys.bin").stat().st_size == 200 * 12


def test_a_later_success_counts_and_exclude_run_ignores_one_run(tmp_path: Path) -> None:
    refs = images(50)
    ds = open_dataset(str(tmp_path))
    ds.write_part("night1", "part-0000000-a", rows("night1", refs[:30], "ok"))
    ds.write_part("night1", "part-0000001-b", rows("night1", refs[30:], "failed"))
    ds.write_part("night2", "part-0000000-c", rows("night2", refs[20:40], "ok"))  # retried ok
    everything = Ledger.open(str(tmp_path))
    assert everything.answered(ids(refs)) == set(ids(refs[:40]))
    # enqueueing night2 again: its own answers must not shrink its chunks
    not_night2 = Ledger.open(str(tmp_path), exclude_run="night2")
    assert not_night2.answered(ids(refs)) == set(ids(refs[:30]))
    assert Ledger.open(str(tmp_path), exclude_run="night1").answered(ids(refs)) == set(ids(refs[20:40]))


def test_updates_are_incremental(tmp_path: Path) -> None:
    refs = images(400)
    ds = open_dataset(str(tmp_path))
    ds.write_part("r1", "part-0000000-a", rows("r1", refs[:100], "ok"))
    assert Ledger.open(str(tmp_path)).stats.files_ingested == 1
    again = Ledger.open(str(tmp_path))
    assert again.stats.files_ingested == 0 and not again.stats.rebuilt
    ds.write_part("r2", "part-0000000-b", rows("r2", refs[100:250], "no_plate"))
    ds.write_part("r1", "part-0000001-c", rows("r1", refs[250:300], "ok"))
    ledger = Ledger.open(str(tmp_path))
    assert ledger.stats.files_ingested == 2 and ledger.stats.entries == 300
    assert ledger.answered(ids(refs)) == set(ids(refs[:300]))
    # a redelivered chunk overwrites its part (same name, new content): it is read again
    ds.write_part("r1", "part-0000000-a", rows("r1", refs[:100] + refs[300:310], "ok"))
    ledger = Ledger.open(str(tmp_path))
    assert ledger.stats.files_ingested == 1
    assert ledger.answered(ids(refs[300:310])) == set(ids(refs[300:310]))


def test_compaction_keeps_answers_without_a_rebuild(tmp_path: Path) -> None:
    refs = images(120)
    ds = open_dataset(str(tmp_path))
    for k in range(4):
        ds.write_part(
            "r1", f"part-{k:07d}-x", rows("r1", refs[k * 30 : k * 30 + 30], "ok" if k < 3 else "failed")
        )
    assert Ledger.open(str(tmp_path)).answered(ids(refs)) == set(ids(refs[:90]))
    compact_run(ds, "r1")
    assert any(p.name.startswith("compacted-") for p in (tmp_path / "run=r1").iterdir())
    ledger = Ledger.open(str(tmp_path))
    assert not ledger.stats.rebuilt
    assert ledger.answered(ids(refs)) == set(ids(refs[:90]))
    assert ledger.stats.entries == 90  # the compacted rows deduplicate against the parts'


def test_deleted_run_triggers_a_rebuild(tmp_path: Path) -> None:
    refs = images(60)
    ds = open_dataset(str(tmp_path))
    ds.write_part("old", "part-0000000-a", rows("old", refs[:30], "ok"))
    ds.write_part("new", "part-0000000-b", rows("new", refs[30:], "ok"))
    assert len(Ledger.open(str(tmp_path)).answered(ids(refs))) == 60
    shutil.rmtree(tmp_path / "run=old")
    ledger = Ledger.open(str(tmp_path))
    assert ledger.stats.rebuilt
    assert ledger.answered(ids(refs)) == set(ids(refs[30:]))


def test_many_merges_match_a_plain_set(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    refs = images(6000)
    answered: set[str] = set()
    ds = open_dataset(str(tmp_path))
    for k in range(12):
        picked = [refs[i] for i in rng.choice(len(refs), 400, replace=False)]
        status = "ok" if k % 3 else "no_plate"
        ds.write_part(f"run{k % 4}", f"part-{k:07d}-z", rows(f"run{k % 4}", picked, status))
        answered |= set(ids(picked))
        if k % 4 == 3:  # update in between, with tiny merge batches
            Ledger.open(str(tmp_path), batch_entries=150)
    ledger = Ledger.open(str(tmp_path), batch_entries=150)
    got: set[str] = set()
    all_ids = ids(refs)
    for i in range(0, len(all_ids), 200):
        got |= ledger.answered(all_ids[i : i + 200])
    assert got == answered
    keys = np.fromfile(tmp_path / "_ledger/v1/keys.bin", dtype=[("h", "<u8"), ("r", "<u4")])
    assert (np.diff(keys["h"].astype(np.float64)) >= 0).all()  # one sorted array


def test_keys_of_hex_and_other_ids() -> None:
    hex_id = "0123456789abcdef0123"
    (k,) = keys_of([hex_id])
    assert int(k) == 0x0123456789ABCDEF
    odd = ["short", "not-hex-but-long-enough", "车牌车牌车牌车牌车牌车牌车牌车牌", hex_id.upper()]
    keys = keys_of(odd)
    assert len(set(keys.tolist())) == 4
    assert int(keys[3]) == 0x0123456789ABCDEF  # case does not matter for hex ids
    assert keys_of(odd[:2]).tolist() == keys[:2].tolist()  # same key with or without the fast path


def test_ids_that_are_not_hex_work_end_to_end(tmp_path: Path) -> None:
    refs = [ImageRef("file:///x/a.jpg", image_id=f"camera-7/frame {i}") for i in range(10)]
    open_dataset(str(tmp_path)).write_part("r1", "part-0000000-a", rows("r1", refs[:5], "ok"))
    assert Ledger.open(str(tmp_path)).answered(ids(refs)) == set(ids(refs[:5]))


@pytest.mark.parametrize("damage", ["garbage", "wrong-version"])
def test_damaged_state_is_rebuilt(tmp_path: Path, damage: str) -> None:
    refs = images(20)
    open_dataset(str(tmp_path)).write_part("r1", "part-0000000-a", rows("r1", refs, "ok"))
    Ledger.open(str(tmp_path))
    state = tmp_path / "_ledger/v1/state.json"
    state.write_text("{oops" if damage == "garbage" else '{"version": 99, "runs": [], "files": {}}')
    ledger = Ledger.open(str(tmp_path))
    assert ledger.stats.rebuilt and ledger.answered(ids(refs)) == set(ids(refs))
