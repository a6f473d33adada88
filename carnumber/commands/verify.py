"""``carnumber verify RUN_ID`` — reconcile what was enqueued for a run against its output.

Prints a short table (``--json``: one JSON object) and exits 0 only when every enqueued image has
exactly one outcome and nothing is missing, parked, duplicated, unexpected or unrecorded; 1 on a
mismatch, with the reasons in one line at the end (on stderr with ``--json``); 2 for bad input
(an unknown run, a run with no enqueued records). ``--republish`` then publishes the missing
images again. The logic is :func:`producers.verify.verify_run` and ``republish_missing``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from carnumber.commands.common import configure_celery, connect_redis, run_store, settings_from

if TYPE_CHECKING:
    from producers.verify import Verification

__all__ = ["add_arguments", "main", "render", "verdict"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    parser.add_argument(
        "--missing",
        metavar="FILE.csv",
        help="write every missing, parked and duplicated image (kind, image_id, url, chunk_id) to "
        "this CSV, which `carnumber enqueue` also reads as a manifest",
    )
    parser.add_argument(
        "--examples", type=int, default=5, help="images listed per kind of mismatch (default 5)"
    )
    parser.add_argument(
        "--republish",
        action="store_true",
        help="publish the missing images again (a lost message or part file), then verify again "
        "once the run is done",
    )


def render(v: Verification) -> str:
    """The table ``carnumber verify`` prints (without the verdict line)."""
    files = f"{v.part_files} part files, {v.compacted_files} compacted files"
    stop = f" ({v.stop_code})" if v.stop_code else ""
    lines = [
        f"run {v.run_id}: state {v.state}{stop}; {_compaction(v.compaction)} ({files})",
        f"  {'enqueued':<22}{v.enqueued:>9}  images in {v.record_chunks} chunks"
        + (f"; {v.listed_twice} listed twice" if v.listed_twice else "")
        + (
            f"; {v.skipped_answered_earlier} not enqueued (answered in earlier runs)"
            if v.skipped_answered_earlier
            else ""
        ),
        f"  {'exactly one outcome':<22}{v.exactly_one:>9}  ({v.answered} answered, {v.failed} failed"
        + (f"; {v.superseded} superseded a failure" if v.superseded else "")
        + ")",
    ]
    labels = {
        "missing": "missing",
        "in_flight": "in flight",
        "parked": "parked",
        "duplicated": "duplicated",
        "unexpected": "unexpected",
        "unrecorded": "unrecorded chunks",
    }
    for kind, n in v.counts().items():
        note = ""
        if kind == "parked" and v.parked:
            note = f"  in {v.parked_chunks} chunks, run {v.state}{stop}: fix the cause, carnumber resume"
        elif kind == "in_flight" and n:
            note = "  queued or held by a worker: they will still run (not republished)"
        elif kind == "missing" and n:
            note = "  in no live message: lost; --republish publishes them again"
        lines.append(f"  {labels[kind]:<22}{n:>9}{note}")
        for e in v.examples.get(kind, []):
            lines.append(f"      {e.image_id} {e.source or ''} ({e.detail})".replace("  (", " ("))
    for u in v.unfinished:
        lines.append(f"  {'NOT ENQUEUED TO ITS END':<22} {u}")
    for i, f in enumerate(v.failed_by_code):
        label = "failed by code" if i == 0 else ""
        lines.append(f"  {label:<22}{f.images:>9}  {f.code} ({'retryable' if f.retryable else 'final'})")
    return "\n".join(lines)


def _compaction(state: str) -> str:
    return {"none": "not compacted", "partial": "partly compacted"}.get(state, state)


def verdict(v: Verification) -> str:
    """The one line that ends the output: OK, or MISMATCH and the reasons."""
    if v.ok:
        return f"verify run {v.run_id}: OK, each of {v.enqueued} enqueued images has exactly one outcome"
    return f"verify run {v.run_id}: MISMATCH: {', '.join(v.reasons())}"


def main(args: argparse.Namespace) -> int:
    import pyarrow.csv as pacsv

    from producers.verify import verify_run
    from workers.books.queued import live_chunks
    from workers.errors import InputError
    from workers.sink.dataset import check_run_id, open_dataset

    if args.examples < 0:
        raise InputError(f"--examples {args.examples}: give 0 or more")
    settings = settings_from(args)
    check_run_id(args.run_id)
    client = connect_redis(settings)
    runs = run_store(settings, client)
    live = live_chunks(client, settings.queue, args.run_id)  # queued or held: they will still run
    found = verify_run(open_dataset(settings.output), runs, args.run_id, live=live, examples=args.examples)
    if args.missing:
        try:
            pacsv.write_csv(found.mismatched, args.missing)
        except OSError as exc:
            raise InputError(f"--missing {args.missing}: cannot write ({exc})") from None
    if args.json:
        print(json.dumps(found.to_json(), ensure_ascii=False, indent=2))
    else:
        print(render(found))
    if args.republish and found.missing:
        from producers.verify import republish_missing
        from workers.books.outcomes import OutcomeBook
        from workers.tasks import publish_chunk

        configure_celery(settings)
        chunks = republish_missing(
            found,
            open_dataset(settings.output),
            runs,
            lambda chunk: publish_chunk(chunk, settings.queue),
            OutcomeBook(client, runs.keys),
        )
        left = found.missing - sum(len(c.images) for c in chunks)
        print(
            f"run {args.run_id}: re-published {sum(len(c.images) for c in chunks)} missing images in "
            f"{len(chunks)} chunks (their own chunk ids); verify again when it is done"
            + (f"; {left} belong to an unfinished enqueue: carnumber resume {args.run_id}" if left else ""),
            file=sys.stderr if args.json else sys.stdout,
        )
    print(verdict(found), file=sys.stderr if args.json else sys.stdout)
    return 0 if found.ok else 1
