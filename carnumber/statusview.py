"""How ``carnumber status`` shows :class:`~carnumber.runview.RunFigures`: a ``rich`` panel for a
terminal, one plain line for logs, a closing summary, and the table of recent runs.

Pure functions of the figures (and the time), so tests render them without a terminal.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from carnumber.runview import RunFigures
from workers.books.runs import RunSummary

__all__ = ["duration", "plain_line", "render", "runs_table", "summary", "when"]

_STYLE = {
    "done": "bold green",
    "running": "green",
    "enqueuing": "cyan",
    "quota_exhausted": "yellow",
    "circuit_open": "yellow",
    "redis_unavailable": "yellow",
    "paused": "yellow",
    "cancelled": "magenta",
}


def duration(seconds: float | None) -> str:
    """``1h02m``, ``4m05s``, ``12s``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = round(max(0.0, seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def when(at_s: float | None) -> str:
    """A UTC time, ``2026-11-24 05:12Z``; ``-`` when unknown."""
    if at_s is None:
        return "-"
    return dt.datetime.fromtimestamp(at_s, dt.UTC).strftime("%Y-%m-%d %H:%MZ")


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _money(x: float | None) -> str:
    return "-" if x is None else f"{x:,.2f}"


def _limit(f: RunFigures) -> str:
    return "unlimited" if f.qps_limit <= 0 else f"{f.qps_limit:g}"


def _quota(f: RunFigures) -> str:
    if f.quota_limit is None:
        return "no quota"
    resets = "never resets" if f.quota_resets_at_s is None else f"resets {when(f.quota_resets_at_s)}"
    return f"{f.quota_used}/{f.quota_limit} used, {f.quota_left} left ({f.quota_window}; {resets})"


def _eta(f: RunFigures) -> str:
    if f.pending == 0 and f.state == "done":
        return "finished"
    if f.eta_s is None:
        return "unknown (no progress yet)"
    text = f"{duration(f.eta_s)} (at {when(f.finish_at_s)}, {f.eta_basis} rate {_num(f.images_per_s)} img/s)"
    if f.deadline_at_s is not None:
        verdict = "before" if f.on_time else "AFTER"
        text += f", {verdict} the deadline {when(f.deadline_at_s)}"
    return text


def _workers(f: RunFigures) -> str:
    if f.workers is None:
        return "unknown (workers not asked)"
    if not f.workers:
        return "none answering"
    names = ", ".join(f.workers[:4]) + (f" +{len(f.workers) - 4}" if len(f.workers) > 4 else "")
    running = f"{f.chunks_running} chunks / {f.images_running} images of this run in progress"
    if f.calls_in_flight is not None:
        running += f"; {f.calls_in_flight} calls in flight"
    return f"{len(f.workers)} alive ({names}); {running}"


def _cost(f: RunFigures) -> str:
    if f.price_per_1000_calls is None:
        return "set CARNUMBER_PRICE_PER_1000_CALLS to see it"
    price = f"{f.price_per_1000_calls:g} per 1000 calls"
    return f"{_money(f.cost)} so far, {_money(f.cost_projected)} projected ({price})"


def render(f: RunFigures) -> RenderableType:
    """The live panel of one run."""
    style = "bold red" if f.fleet.startswith("stopped") else _STYLE.get(f.fleet, "white")
    head = Text.assemble((f"run {f.run_id}  ", "bold"), (f.fleet, style), f"   age {duration(f.age_s)}")
    bar = Table.grid(padding=(0, 1))
    bar.add_column(width=40)
    bar.add_column()
    bar.add_row(
        ProgressBar(total=max(1, f.enqueued), completed=f.written, width=40),
        f"{f.written:,}/{f.enqueued:,} images ({100 * f.progress:.1f}%)",
    )
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", justify="right")
    grid.add_column()
    grid.add_row(
        "images",
        f"done {f.written - f.failed:,}  failed {f.failed:,}  pending {f.pending:,}  "
        f"parked {f.parked:,}  skipped {f.skipped:,}  plates {f.plates:,}",
    )
    grid.add_row(
        "calls/s",
        f"{_num(f.calls_per_s_10s)} last 10 s, {_num(f.calls_per_s_1m)} last min  (limit {_limit(f)})"
        f"   throttled last min: {f.throttled_1m}",
    )
    grid.add_row("calls", f"{f.calls:,} for this run's images")
    grid.add_row("quota", _quota(f))
    grid.add_row("finish", _eta(f))
    grid.add_row("queue", f"{f.queue_depth} chunks waiting, {f.chunks_unacked} delivered (all runs)")
    grid.add_row("workers", _workers(f))
    grid.add_row("circuit", f.circuit)
    if f.stop_code:
        grid.add_row("stop", Text(f"{f.stop_code}: {f.stop_message or ''}", style="red"))
    for line in _unfinished(f):
        grid.add_row("enqueue", Text(line, style="bold red"))
    grid.add_row("cost", _cost(f))
    return Panel(Group(head, bar, grid), title="carnumber status", subtitle=when(f.at_s))


def plain_line(f: RunFigures) -> str:
    """One line for logs and pipes; starts as the old ``carnumber status`` line did."""
    stop = f" stop={f.stop_code}" if f.stop_code else ""
    parts = [
        f"{f.run_id}: {f.state}{stop} {f.written}/{f.enqueued} images ({100 * f.progress:.1f}%),",
        f"failed={f.failed} plates={f.plates} calls={f.calls} parked={f.parked} in-flight/queued={f.pending}",
        f"fleet={f.fleet.replace(' ', '')}",
        f"calls/s={_num(f.calls_per_s_10s)}/10s,{_num(f.calls_per_s_1m)}/1m limit={_limit(f)}",
        f"throttled/1m={f.throttled_1m}",
    ]
    if f.quota_limit is not None:
        parts.append(f"quota_left={f.quota_left}/{f.quota_limit}")
    parts.append(f"eta={duration(f.eta_s)}")
    if f.deadline_at_s is not None and f.on_time is not None:
        parts.append("on_time=yes" if f.on_time else "on_time=NO")
    if f.workers is not None:
        parts.append(f"workers={len(f.workers)}")
    if f.calls_in_flight is not None:
        parts.append(f"in_flight={f.calls_in_flight}")
    if f.cost is not None:
        parts.append(f"cost={f.cost:.2f}/{(f.cost_projected or 0):.2f}")
    parts.extend(f"| {line}" for line in _unfinished(f))
    return " ".join(parts)


def _unfinished(f: RunFigures) -> list[str]:
    """What an operator must do about sources that were not enqueued to their end."""
    return [
        f"{source} NOT enqueued to its end ({published:,} images published; {why}): "
        f"`carnumber resume {f.run_id}` finishes it ({command or 'carnumber enqueue SOURCE'})"
        for source, published, why, command in f.unfinished
    ]


def summary(f: RunFigures, watched_s: float) -> str:
    """The closing lines of ``--follow``: how the run ended and what to do next."""
    ended = {
        "done": "finished",
        "quota_exhausted": "paused: call quota spent (carnumber resume after it resets)",
        "stopped": f"stopped by {f.stop_code or 'a fatal answer'} (fix it, then carnumber resume {f.run_id})",
        "circuit_open": f"paused: the service kept failing (carnumber resume {f.run_id} once it answers)",
        "paused": f"paused (carnumber resume {f.run_id})",
        "redis_unavailable": f"paused: Redis was out of reach too long (carnumber resume {f.run_id})",
        "cancelled": "cancelled",
        "incomplete": f"NOT finished: a source was not enqueued to its end (carnumber resume {f.run_id})",
        "shutdown": f"paused: its workers were shut down (carnumber resume {f.run_id})",
    }.get(f.state, f.state)
    lines = [
        f"run {f.run_id} {ended}: {f.written}/{f.enqueued} images with an outcome "
        f"({f.failed} failed), {f.parked} parked, {f.plates} plates, {f.calls} calls",
        f"  watched {duration(watched_s)}; run age {duration(f.age_s)}"
        + (f"; cost {_money(f.cost)}" if f.cost is not None else ""),
        *(f"  {line}" for line in _unfinished(f)),
    ]
    return "\n".join(lines)


def runs_table(runs: Sequence[RunSummary], now_s: float) -> tuple[RenderableType, list[str]]:
    """Recent runs as a ``rich`` table and as plain lines: state, progress, age."""
    table = Table(title="carnumber runs")
    for col in ("run", "state", "progress", "failed", "parked", "age"):
        table.add_column(col, justify="right" if col not in ("run", "state") else "left")
    lines = []
    for s in runs:
        pct = 100.0 * s.written / s.enqueued if s.enqueued else 0.0
        try:
            age = duration(now_s - float(s.fields.get("created_at", now_s)))
        except ValueError:
            age = "-"
        failed = s.fields.get("images_failed", "0")
        progress = f"{s.written}/{s.enqueued} ({pct:.1f}%)"
        table.add_row(s.run_id, s.state, progress, failed, str(s.parked), age)
        lines.append(f"{s.run_id}: {s.state} {progress} failed={failed} parked={s.parked} age={age}")
    return table, lines
