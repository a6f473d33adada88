"""Progress of long commands: one ``rich`` progress bar on a terminal, periodic plain log lines
otherwise (logs, pipes, systemd), from the same calls.

    with Progress("compact run 2026-11-23", total=len(files), unit="parts") as progress:
        for ...:
            progress.update(completed=i + 1, rows=rows_so_far)

``update`` is cheap: on a terminal ``rich`` redraws a few times a second; without one a line
``compact run 2026-11-23: 120/800 parts (15.0%), 41.3 parts/s, rows=240000`` is logged at most
every ``every_s`` seconds, and a last one on close. :func:`enqueue_progress` adapts the
producer's ``on_progress`` report (images listed, skipped, enqueued, time waiting on the queue's
high-water mark) to it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

__all__ = ["Progress", "enqueue_progress"]

log = logging.getLogger("carnumber.progress")


def _fields_text(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


class Progress:
    """A progress display for ``description``. ``total``: known amount of work, or ``None``;
    ``unit``: what is counted; ``tty``: force the terminal form on or off (default: whether
    ``stream`` is a terminal); ``every_s``: seconds between plain lines; ``emit``: where plain
    lines go (default: the ``carnumber.progress`` logger at INFO); ``clock``: seconds."""

    def __init__(
        self,
        description: str,
        total: int | None = None,
        *,
        unit: str = "items",
        stream: TextIO | None = None,
        tty: bool | None = None,
        every_s: float = 30.0,
        emit: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = every_s
        self.emit = emit if emit is not None else log.info
        self.clock = clock
        self.completed = 0
        self.fields: dict[str, Any] = {}
        self.started = clock()
        self._last_line = self.started
        self._bar: Any = None
        self._task: Any = None
        if self.tty:
            self._start_bar()

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[extra]}"),
            console=Console(file=self.stream),
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(self.description, total=self.total, rate="", extra="")

    @property
    def rate(self) -> float:
        """Units per second since the start."""
        return self.completed / max(1e-9, self.clock() - self.started)

    def line(self) -> str:
        """The plain line for now."""
        done = f"{self.completed}/{self.total} {self.unit}" if self.total else f"{self.completed} {self.unit}"
        pct = f" ({100.0 * self.completed / self.total:.1f}%)" if self.total else ""
        extra = f", {_fields_text(self.fields)}" if self.fields else ""
        return f"{self.description}: {done}{pct}, {self.rate:.1f} {self.unit}/s{extra}"

    def update(
        self, completed: int | None = None, advance: int = 0, total: int | None = None, **fields: Any
    ) -> None:
        """Set ``completed`` (or add ``advance``), optionally a new ``total``, and named figures
        shown beside the bar (``skipped=12``)."""
        self.completed = completed if completed is not None else self.completed + advance
        if total is not None:
            self.total = total
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.update(
                self._task,
                completed=self.completed,
                total=self.total,
                rate=f"{self.rate:.1f} {self.unit}/s",
                extra=_fields_text(self.fields),
            )
            return
        now = self.clock()
        if now - self._last_line >= self.every_s:
            self._last_line = now
            self.emit(self.line())

    def close(self) -> None:
        """Stop the bar, or log the last line."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        else:
            self.emit(self.line() + f", done in {self.clock() - self.started:.1f}s")

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def enqueue_progress(
    run_id: str, total: int | None = None, **options: Any
) -> tuple[Progress, Callable[[Any], None]]:
    """A :class:`Progress` for enqueueing ``run_id`` and the ``on_progress`` callback for
    :func:`producers.enqueue.enqueue`, which hands it its running ``EnqueueReport``: images
    listed (``images_seen``, the bar), enqueued, skipped (answered earlier, duplicates, chunks
    already published) and the seconds spent waiting on the queue's high-water mark."""
    progress = Progress(f"enqueue {run_id}", total=total, unit="images", **options)

    def on_progress(report: Any) -> None:
        progress.update(
            completed=report.images_seen,
            enqueued=report.images_enqueued,
            skipped=report.images_already_answered + report.duplicates_dropped,
            chunks_skipped=report.chunks_already_published,
            waited_s=report.waited_s,
        )

    return progress, on_progress
