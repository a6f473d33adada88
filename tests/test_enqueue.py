"""The producer: position-based chunk ids, no duplicates on re-run, backpressure, ledger skips."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import redis

from producers.enqueue import enqueue
from workers.books.runs import RunStore
from workers.errors import InputError
from workers.keys import Keys
from workers.message import Chunk, ImageRef


def _refs(n: int) -> list[ImageRef]:
    return [ImageRef(f"file:///archive/{i:05d}.jpg", meta={"camera": str(i % 3)}) for i in range(n)]


def test_rerun_publishes_nothing_twice(redis_client: redis.Redis, key_prefix: str) -> None:
    runs = RunStore(redis_client, Keys(key_prefix))
    published: list[Chunk] = []
    kwargs = dict(
        runs=runs,
        publish=published.append,
        queue_depth=lambda: 0,
        chunk_size=10,
        queue_high_water=5,
    )
    first = enqueue(_refs(25), "r1", **kwargs)  # type: ignore[arg-type]
    assert (first.chunks_published, first.images_enqueued) == (3, 25)
    assert [c.chunk_id for c in published] == ["0000000", "0000001", "0000002"]
    again = enqueue(_refs(25), "r1", **kwargs)  # type: ignore[arg-type]
    assert (again.chunks_published, again.chunks_already_published) == (0, 3)
    summary = runs.get("r1")
    assert summary is not None and summary.enqueued == 25
    # The source changed under the same run id: a clear error, nothing published twice.
    with pytest.raises(InputError, match="source changed"):
        enqueue(_refs(32), "r1", **kwargs)  # type: ignore[arg-type]
    assert len(published) == 3


def test_backpressure_waits_below_high_water(redis_client: redis.Redis, key_prefix: str) -> None:
    runs = RunStore(redis_client, Keys(key_prefix))
    depth = {"n": 0}
    sleeps: list[float] = []

    def publish(chunk: Chunk) -> None:
        depth["n"] += 1

    def sleep(s: float) -> None:  # a worker drains the queue while the producer waits
        sleeps.append(s)
        depth["n"] = max(0, depth["n"] - 2)

    report = enqueue(
        _refs(100),
        "r2",
        runs=runs,
        publish=publish,
        queue_depth=lambda: depth["n"],
        chunk_size=5,
        queue_high_water=4,
        sleep=sleep,
    )
    assert report.chunks_published == 20
    assert sleeps, "the producer must have waited"
    assert depth["n"] <= 4


class _Ledger:
    def __init__(self, done: set[str]) -> None:
        self.done = done

    def answered(self, image_ids: Sequence[str]) -> set[str]:
        return self.done & set(image_ids)


def test_ledger_and_duplicates_are_dropped_but_chunk_ids_stay(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    runs = RunStore(redis_client, Keys(key_prefix))
    refs = _refs(20)
    refs.insert(3, refs[2])  # the manifest lists one image twice
    published: list[Chunk] = []
    report = enqueue(
        refs,
        "r3",
        runs=runs,
        publish=published.append,
        queue_depth=lambda: 0,
        chunk_size=10,
        queue_high_water=50,
        ledger=_Ledger({refs[0].image_id, refs[15].image_id}),
    )
    assert report.duplicates_dropped == 1
    assert report.images_already_answered == 2
    assert report.images_enqueued == 18
    ids = [r.image_id for c in published for r in c.images]
    assert len(ids) == len(set(ids)) == 18
    assert [c.chunk_id for c in published] == ["0000000", "0000001", "0000002"]


def test_records_every_chunk_before_publishing_and_a_rerun_overwrites(
    redis_client: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    from workers.sink.dataset import open_dataset
    from workers.sink.enqueued import EnqueuedRecords, recorder

    runs = RunStore(redis_client, Keys(key_prefix))
    refs = _refs(9)
    refs[4] = ImageRef("https://cams.example/x.jpg?Signature=s3cr3t&OSSAccessKeyId=k&size=big")
    order: list[str] = []
    record = recorder(str(tmp_path / "out"))
    fail_at = {"chunk": "0000001"}

    def publish(chunk: Chunk) -> None:
        order.append(f"publish {chunk.chunk_id}")
        if chunk.chunk_id == fail_at["chunk"]:
            raise ConnectionError("broker went away")  # the producer dies between record and publish

    def rec(chunk: Chunk) -> None:
        order.append(f"record {chunk.chunk_id}")
        record(chunk)

    kwargs = dict(runs=runs, queue_depth=lambda: 0, chunk_size=3, queue_high_water=5, record=rec)
    ledger = _Ledger({r.image_id for r in refs[6:9]})  # the last chunk was answered in earlier runs
    with pytest.raises(ConnectionError):
        enqueue(refs, "r4", publish=publish, ledger=ledger, **kwargs)  # type: ignore[arg-type]
    assert order == ["record 0000000", "publish 0000000", "record 0000001", "publish 0000001"]

    records = EnqueuedRecords(open_dataset(str(tmp_path / "out")))
    assert sorted(records.files("r4")) == ["0000000", "0000001"]  # written before the publish failed
    fail_at["chunk"] = ""
    order.clear()
    again = enqueue(refs, "r4", publish=publish, ledger=ledger, **kwargs)  # type: ignore[arg-type]
    assert again.chunks_already_published == 1 and again.images_already_answered == 3
    # The same chunk is recorded again (same file, overwritten), and the answered chunk is an empty record.
    assert order == ["record 0000001", "publish 0000001", "record 0000002"]
    assert sorted(records.files("r4")) == ["0000000", "0000001", "0000002"]
    table = records.read("r4")
    assert table["image_id"].to_pylist() == [r.image_id for r in refs[:6]]  # once each, in order
    assert table["chunk_id"].to_pylist() == ["0000000"] * 3 + ["0000001"] * 3
    assert table["source"][4].as_py() == "https://cams.example/x.jpg?size=big"  # never a signature
    assert "s3cr3t" not in (
        tmp_path / "out" / "_enqueued" / "run=r4" / "chunk-0000001.parquet"
    ).read_bytes().decode("latin-1")
    assert records.refs("r4", [refs[1].image_id])[0].meta == {"camera": "1"}
    # Readers of the output and the ledger never see the records.
    assert open_dataset(str(tmp_path / "out")).parquet_files(str(tmp_path / "out")) == []
