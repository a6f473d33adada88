"""The stalled-run repair (workers/books/repair.py) against a real Redis and real producer records: a
run whose chunk messages Redis lost (a crash, a failover to a replica that lacked them) has its
images without an outcome republished once, under their own chunk ids and positions."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from tests.helpers.books import answer
from workers.books.outcomes import OutcomeBook
from workers.books.repair import StalledRuns
from workers.books.runs import RunStore
from workers.keys import Keys
from workers.message import Chunk, ImageRef
from workers.sink.dataset import open_dataset
from workers.sink.enqueued import EnqueuedRecords


def _world(client: redis.Redis, prefix: str, tmp_path: Path) -> tuple[RunStore, StalledRuns, list[Chunk]]:
    keys = Keys(prefix)
    runs = RunStore(client, keys)
    dataset = open_dataset(str(tmp_path / "out"))
    records = EnqueuedRecords(dataset)
    published: list[Chunk] = []
    repair = StalledRuns(
        runs, OutcomeBook(client, keys), records, dataset, f"{prefix}-queue", published.append, stall_s=0.3
    )
    runs.create("r", "test")
    argv = ["carnumber", "enqueue", "test", "--run", "r"]
    runs.enqueue_progress("r", "test", "complete", 8, argv)
    for k in range(2):
        chunk = Chunk("r", f"{k:07d}", tuple(ImageRef(f"file:///cams/{k}-{i}.jpg") for i in range(4)))
        records.write(chunk)
        runs.mark_enqueued("r", chunk.chunk_id, "d", 4)
    return runs, repair, published


def test_a_stalled_run_has_its_lost_images_republished_once(
    redis_client: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    runs, repair, published = _world(redis_client, key_prefix, tmp_path)
    answer(runs, "r", "0000000", 4)
    answer(runs, "r", "0000001", 2)  # positions 0, 1; the message holding 2, 3 was lost
    assert repair.check("r") == 0  # stalled from now on
    time.sleep(0.5)
    assert repair.check("r") == 2
    assert [(c.chunk_id, c.position_of()) for c in published] == [("0000001", (2, 3))]
    summary = runs.get("r")
    assert summary is not None and summary.fields["images_republished_auto"] == "2"
    # Lost again: not republished a second time (verify reports what is left).
    assert repair.check("r") == 0
    time.sleep(0.5)
    assert repair.check("r") == 0 and len(published) == 1


def test_a_run_with_a_chunk_alive_on_the_broker_is_not_stalled(
    redis_client: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    from workers.celery import app, celery_config
    from workers.config import Settings
    from workers.tasks import publish_chunk

    runs, repair, published = _world(redis_client, key_prefix, tmp_path)
    answer(runs, "r", "0000000", 4)
    url = redis_client.connection_pool.connection_kwargs
    app.conf.update(
        celery_config(Settings(redis_url=f"redis://{url['host']}:{url['port']}/{url['db']}"))
    )
    publish_chunk(Chunk("r", "0000001", tuple(ImageRef(f"file:///cams/1-{i}.jpg") for i in range(4))),
                  f"{key_prefix}-queue")  # fmt: skip
    try:
        assert repair.check("r") == 0
        time.sleep(0.5)
        assert repair.check("r") == 0 and published == []
    finally:
        redis_client.delete(f"{key_prefix}-queue")


def test_chunks_a_failover_uncounted_are_counted_again_and_published(
    redis_client: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    # The promoted replica lacks the second chunk's count (and its message): every counted image
    # is answered, so the books say done; the producer's records say otherwise.
    runs, repair, published = _world(redis_client, key_prefix, tmp_path)
    redis_client.hdel(runs.keys.run_chunks("r"), "0000001")
    redis_client.hincrby(runs.keys.run("r"), "images_enqueued", -4)
    answer(runs, "r", "0000000", 4)
    assert runs.get("r").state == "done"  # type: ignore[union-attr]
    assert repair.check("r") == 4
    assert [(c.chunk_id, len(c.images)) for c in published] == [("0000001", 4)]
    summary = runs.get("r")
    assert summary is not None and (summary.state, summary.enqueued) == ("running", 8)
    assert runs.enqueued_digest("r", "0000001") == "repaired:4"  # the producer's re-run skips it
    assert repair.check("r") == 0 and len(published) == 1  # once


def test_images_whose_rows_reached_the_output_are_counted_not_paid_again(
    redis_client: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    # The failover lost the chunk's count and its bits, not its rows: two of its images were
    # written before the master died.
    from workers.api.response import Recognition
    from workers.sink.rows import recognition_rows

    runs, repair, published = _world(redis_client, key_prefix, tmp_path)
    redis_client.hdel(runs.keys.run_chunks("r"), "0000001")
    redis_client.hincrby(runs.keys.run("r"), "images_enqueued", -4)
    answer(runs, "r", "0000000", 4)
    lost = EnqueuedRecords(open_dataset(str(tmp_path / "out"))).chunk("r", "0000001")
    assert lost is not None
    rec = Recognition("req", (), 10, 10, 10, 10)
    rows = [row for ref in lost.images[:2] for row in recognition_rows("r", ref, rec, 1)]
    open_dataset(str(tmp_path / "out")).write_part("r", "part-0000001-x", rows)
    assert repair.check("r") == 2
    assert [c.position_of() for c in published] == [(2, 3)]
    assert runs.get("r").written == 6  # type: ignore[union-attr]


def test_a_record_keeps_the_producer_s_verdicts_for_republishing(tmp_path: Path) -> None:
    # A refused item republished (verify --republish, the repair) is refused again, not read;
    # a sealed URL is fetched from the sealed store again, not from its redacted source.
    records = EnqueuedRecords(open_dataset(str(tmp_path / "out")))
    refs = (
        ImageRef("file:///cams/a.jpg", meta={"camera": "7"}),
        ImageRef("file:///cams/link.jpg", refused=("local.link", "a link out of the folder")),
        ImageRef("https://cdn.example/x.jpg", sealed=True),
    )
    records.write(Chunk("r", "0000000", refs))
    again = records.chunk("r", "0000000")
    assert again is not None and again.images == refs
    assert records.chunks("r", [refs[1].image_id])[0].images == (refs[1],)
