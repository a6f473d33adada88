"""``carnumber status [RUN_ID]`` — a run's progress, rate, quota, estimated finish, fleet,
workers and cost (or the recent runs).

On a terminal: a ``rich`` live view refreshed every ``--interval-s`` until the run ends (Ctrl-C
leaves it); ``--once`` draws it once. Without a terminal: one plain line, or one JSON object with
``--json`` (flat, with the run hash's own fields too: scripts read ``state`` and ``source``).
``--follow`` ends when the run does, prints a summary and exits with how it ended:

====  =====================================================================================
 0    done
 3    paused or stopped (quota_exhausted, stopped, circuit_open, redis_unavailable, paused,
      cancelled): the state
      says which (``carnumber status RUN --json``)
 4    still running after ``--timeout-s``
====  =====================================================================================

:func:`follow` (plain lines from the run hash alone) keeps its contract for ``carnumber demo``
and ``carnumber enqueue --wait``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

import redis

from carnumber.commands.common import configure_celery, connect_redis, run_store, settings_from
from workers.books.runs import RunStore, RunSummary
from workers.errors import InputError

if TYPE_CHECKING:
    from carnumber.runview import RunFigures, RunView
    from workers.config import Settings

__all__ = ["FINAL_STATES", "add_arguments", "exit_code", "follow", "line", "main", "make_view"]

FINAL_STATES = (
    "done",
    "incomplete",
    "shutdown",
    "stopped",
    "quota_exhausted",
    "circuit_open",
    "redis_unavailable",
    "paused",
    "cancelled",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", nargs="?", help="run to show; omitted: list recent runs")
    parser.add_argument("--json", action="store_true", help="one JSON object (per refresh with --follow)")
    parser.add_argument(
        "--follow", action="store_true", help="refresh until the run ends; the exit code says how"
    )
    parser.add_argument("--once", action="store_true", help="on a terminal, draw the view once")
    parser.add_argument(
        "--interval-s", type=float, help="refresh interval (default 1.5 on a terminal, 2 otherwise)"
    )
    parser.add_argument("--timeout-s", type=float, help="with --follow: give up after this long (exit 4)")
    parser.add_argument(
        "--no-workers", action="store_true", help="do not ask the Celery workers which are alive"
    )
    parser.add_argument("--limit", type=int, default=20, help="runs to list (default 20)")


def line(runs: RunStore, run_id: str) -> str:
    """The short progress line from the run hash alone."""
    s = runs.get(run_id)
    if s is None:
        return f"{run_id}: unknown run"
    f = s.fields
    pct = 100.0 * s.written / s.enqueued if s.enqueued else 0.0
    extra = f" stop={f['stop_code']}" if f.get("stop_code") else ""
    unfinished = "".join(
        f" NOT ENQUEUED TO ITS END: {e.source} ({e.published} images published; {e.reason or 'no producer'};"
        f" finish with `carnumber resume {run_id}` or `{e.command}`)"
        for e in s.unfinished_enqueues
    )
    if f.get("images_republished_auto"):  # lost by Redis, republished once (workers/books/repair.py)
        extra += f" republished_auto={f['images_republished_auto']}"
    return (
        f"{run_id}: {s.state}{extra} {s.written}/{s.enqueued} images ({pct:.1f}%), "
        f"failed={f.get('images_failed', 0)} plates={f.get('plates', 0)} calls={f.get('calls', 0)} "
        f"parked={s.parked} in-flight/queued={s.outstanding}{unfinished}"
    )


def exit_code(state: str) -> int:
    """0 for a finished run, 3 for one that paused or stopped."""
    return 0 if state == "done" else 3


def follow(
    runs: RunStore,
    run_id: str,
    out: TextIO,
    interval_s: float = 2.0,
    timeout_s: float | None = None,
    on_update: Callable[[RunSummary], None] | None = None,
) -> int:
    """Print :func:`line` every ``interval_s`` until the run is done (0), paused or stopped (3),
    or ``timeout_s`` passed (4); ``on_update`` sees each reading (a progress bar)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        s = runs.get(run_id)
        print(line(runs, run_id), file=out, flush=True)
        if s is not None and on_update is not None:
            on_update(s)
        if s is not None and s.state in FINAL_STATES and (s.state != "done" or s.outstanding == 0):
            return exit_code(s.state)
        if deadline is not None and time.monotonic() > deadline:
            return 4
        time.sleep(interval_s)


def make_view(settings: Settings, client: redis.Redis, ask_workers: bool = True) -> RunView:
    """A :class:`RunView` on the deployment of ``settings`` (asks Celery for workers if told)."""
    from carnumber.monitor import Monitor
    from carnumber.runview import RunView, celery_workers
    from workers.redis_connect import async_client

    url = settings.broker_url
    opts = {**settings.redis_access(), "socket_connect_timeout": 3, "socket_timeout": 5}
    monitor = Monitor(settings, client, lambda: async_client(url, **opts), recent_runs=1)
    workers = None
    if ask_workers:
        configure_celery(settings)
        workers = celery_workers
    return RunView(settings, client, monitor, workers=workers)


def _list(runs: RunStore, args: argparse.Namespace, tty: bool) -> int:
    from carnumber.statusview import runs_table

    summaries = [s for s in (runs.get(r) for r in runs.runs(args.limit)) if s is not None]
    if args.json:
        print(json.dumps([{"run_id": s.run_id, "state": s.state, **s.fields} for s in summaries], indent=2))
        return 0
    table, lines = runs_table(summaries, time.time())
    if tty:
        from rich.console import Console

        Console().print(table)
    else:
        print("\n".join(lines) if lines else "no runs")
    return 0


def _figures(view: RunView, runs: RunStore, run_id: str) -> RunFigures:
    summary = runs.get(run_id)
    if summary is None:
        raise InputError(f"run {run_id!r}: no longer in Redis")
    return view.figures(summary)


def _as_json(runs: RunStore, fig: RunFigures) -> str:
    summary = runs.get(fig.run_id)
    raw = dict(summary.fields) if summary else {}
    return json.dumps({**raw, **fig.to_json()}, indent=2, ensure_ascii=False)


def _plain(view: RunView, runs: RunStore, args: argparse.Namespace) -> int:
    from carnumber.statusview import plain_line, summary

    interval = args.interval_s or 2.0
    started = time.monotonic()
    while True:
        try:
            fig = _figures(view, runs, args.run_id)
        except redis.RedisError as exc:
            if not args.follow:
                raise
            print(f"{args.run_id}: Redis not readable ({type(exc).__name__}); retrying", flush=True)
            time.sleep(interval)
            continue
        if args.json:  # one object per line while following, else one indented object
            print(json.dumps(fig.to_json()) if args.follow else _as_json(runs, fig), flush=True)
        else:
            print(plain_line(fig), flush=True)
        if not args.follow:
            return 0
        if fig.ended:
            print(summary(fig, time.monotonic() - started), flush=True)
            return exit_code(fig.state)
        if args.timeout_s is not None and time.monotonic() - started > args.timeout_s:
            print(summary(fig, time.monotonic() - started), flush=True)
            return 4
        time.sleep(interval)


def _live(view: RunView, runs: RunStore, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from carnumber.statusview import render, summary

    console = Console()
    fig = _figures(view, runs, args.run_id)
    if args.once:
        console.print(render(fig))
        return 0
    interval = args.interval_s or 1.5
    started = time.monotonic()
    code = 0
    try:
        with Live(render(fig), console=console, refresh_per_second=4, transient=False) as live:
            while not fig.ended:
                if args.timeout_s is not None and time.monotonic() - started > args.timeout_s:
                    code = 4
                    break
                time.sleep(interval)
                try:
                    fig = _figures(view, runs, args.run_id)
                except redis.RedisError:
                    continue  # the last figures stay on screen; the next refresh tries again
                live.update(render(fig))
    except KeyboardInterrupt:
        return 130 if args.follow else 0
    console.print(summary(fig, time.monotonic() - started))
    if not args.follow:
        return 0
    return code or exit_code(fig.state)


def main(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    client = connect_redis(settings)
    runs = run_store(settings, client)
    tty = sys.stdout.isatty() and not args.json
    if not args.run_id:
        return _list(runs, args, tty)
    if runs.get(args.run_id) is None:
        raise InputError(f"run {args.run_id!r}: not found in Redis (key prefix {settings.key_prefix!r})")
    view = make_view(settings, client, ask_workers=not args.no_workers)
    return _live(view, runs, args) if tty else _plain(view, runs, args)
