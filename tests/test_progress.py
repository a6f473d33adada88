"""Progress of long commands: plain lines at most every ``every_s`` (and a last one) without a
terminal, a rich bar with one; the enqueue adapter; ``compact_run`` reporting both passes."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

from carnumber.progress import Progress, enqueue_progress
from producers.enqueue import EnqueueReport
from workers.api.response import Recognition
from workers.message import Chunk, ImageRef
from workers.sink.compact import compact_run
from workers.sink.dataset import open_dataset
from workers.sink.rows import recognition_rows

T0 = datetime(2026, 11, 24, tzinfo=UTC)


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_plain_lines_are_periodic_and_end_with_a_summary() -> None:
    lines: list[str] = []
    clock = _Clock()
    with Progress(
        "compact r1", total=100, unit="parts", tty=False, every_s=10, emit=lines.append, clock=clock
    ) as p:
        for i in range(1, 101):
            clock.t = i * 0.5  # 50 s in all: a line at 10, 20, 30, 40, 50 s
            p.update(completed=i, rows=i * 10)
    assert len(lines) == 6
    assert lines[0] == "compact r1: 20/100 parts (20.0%), 2.0 parts/s, rows=200"
    assert lines[-1].startswith("compact r1: 100/100 parts (100.0%), 2.0 parts/s, rows=1000, done in 50.0s")


def test_terminal_form_draws_a_bar() -> None:
    out = io.StringIO()
    with Progress("compact r1", total=4, unit="parts", stream=out, tty=True) as p:
        for _ in range(4):
            p.update(advance=1, step="pass 2/2 (write)")
    text = out.getvalue()
    assert "compact r1" in text and "4/4" in text and "step=pass 2/2 (write)" in text


def test_enqueue_adapter_shows_listed_enqueued_skipped_and_waiting() -> None:
    lines: list[str] = []
    progress, on_progress = enqueue_progress("night-1", tty=False, every_s=0, emit=lines.append)
    report = EnqueueReport("night-1", images_seen=1000, images_enqueued=900, images_already_answered=80)
    report.duplicates_dropped, report.chunks_already_published, report.waited_s = 20, 1, 3.25
    on_progress(report)
    progress.close()
    assert lines[0].startswith("enqueue night-1: 1000 images, ")
    assert "enqueued=900 skipped=100 chunks_skipped=1 waited_s=3.2" in lines[0]


def test_compact_reports_both_passes(tmp_path: Path) -> None:
    ds = open_dataset(str(tmp_path / "out"))
    for k in range(3):
        ref = ImageRef(f"file:///a/{k}.jpg")
        rows = recognition_rows("r", ref, Recognition("rid", (), 1, 1, 1, 1), 1, T0)
        ds.write_part("r", Chunk("r", f"{k:07d}", (ref,)).part_name, rows)
    seen: list[tuple[str, int, int]] = []
    report = compact_run(ds, "r", on_progress=lambda *a: seen.append(a))
    assert report.images == 3
    assert [s for s in seen if s[0] == "read"] == [("read", 1, 3), ("read", 2, 3), ("read", 3, 3)]
    assert seen[-1] == ("write", 3, 3)
