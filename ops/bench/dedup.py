"""Never pay twice for the same picture: copies within a run, and pictures moved between runs.

    python ops/bench/dedup.py                      # 20,000 images, 15 % byte-identical copies
    python ops/bench/dedup.py --images 2000 --json
    python ops/bench/dedup.py --enqueue each       # two `carnumber enqueue` calls into one run

The drill harness's world (``ops/drills/harness.py``): its own Redis, the local server (30 ms per
call, no QPS limit), real ``carnumber worker`` nodes (2, default threads pool, 32 call slots) and
the real ``carnumber enqueue`` / ``verify`` / ``compact`` commands.

1. **Copies within a run.** ``--images`` files of which ``--copies`` (15 %) repeat the bytes of
   another file (a picture may be repeated more than once); all shuffled over two sources, a
   folder and a ``.tar``, so copies sit in other chunks and in the other source. Both sources go
   into one run through one manifest listing the folder's files and the tar's members
   (``--enqueue each``: one ``carnumber enqueue`` per source into the run instead). Met when the
   server accepted exactly one call per distinct picture, every image has exactly one outcome
   (the Parquet output and ``carnumber verify``), and exactly the copies have ``answered_by``
   naming another image of the same picture. Then the run is compacted, as the nightly job does.
2. **The same pictures moved.** Every file again under new paths (a new folder with new names, a
   re-packed tar with new member names, shuffled anew) as a second run. The answer cache is
   brought up to date first (:func:`producers.answer_index.update_answers`, timed; the enqueue
   then finds it current). Met when the server accepted 0 calls, every image has exactly one
   outcome, and every one was answered from the cache: 0 attempts, ``answered_by`` naming a run-1
   image of the same picture whose own call answered it. Also: the size of ``{output}/_answers/``.

Before each run, ``carnumber plan`` over the same manifest: met when the calls it counts equal
the calls the run then makes (17,000, then 0).

Prints a table (``--json``: one JSON object); exits 1 when a measurement is not met, 2 when the
bench itself could not run. Every wait is bounded; Redis, the server, the nodes and the work
directory are removed on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ocrserver.truth import write_test_archive
from ops.bench.reliability import duplicate_rows
from ops.drills.harness import Drill
from producers.sources import open_source
from workers.config import Settings
from workers.sink.dataset import open_dataset

__all__ = ["Figure", "Layout", "main", "write_layout"]

RUNS = ("dedup-1", "dedup-2")


# --- inputs ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Layout:
    """One run's sources: ``ids[k]`` shows picture ``pictures[k]`` (an index into the distinct
    pictures); ``sources`` are the folder and the tar, ``manifest`` lists both."""

    sources: tuple[Path, Path]
    manifest: Path
    ids: list[str]
    pictures: list[int]


def distinct_pictures(work: Path, n: int) -> list[bytes]:
    """``n`` pictures with bytes of their own (``write_test_archive``), read back."""
    staging = work / "distinct"
    write_test_archive(staging, n)
    bodies = [p.read_bytes() for p in sorted(staging.iterdir())]
    shutil.rmtree(staging)
    return bodies


def write_layout(root: Path, bodies: Sequence[bytes], order: Sequence[int], names: tuple[str, str]) -> Layout:
    """Files showing ``bodies[order[k]]``: the first half in folder ``root/<names[0]>``, the rest
    as members of ``root/<names[1]>.tar``, named by position so both list in ``order``."""
    folder, tar_path = root / names[0], root / f"{names[1]}.tar"
    folder.mkdir(parents=True)
    half = len(order) // 2
    for k, picture in enumerate(order[:half]):
        (folder / f"{names[0]}-{k:07d}.png").write_bytes(bodies[picture])
    with tarfile.open(tar_path, "w") as tf:
        for k, picture in enumerate(order[half:], start=half):
            info = tarfile.TarInfo(f"{names[1]}/{k:07d}.png")
            info.size, info.mtime = len(bodies[picture]), int(time.time())
            tf.addfile(info, io.BytesIO(bodies[picture]))
    refs = [r for source in (folder, tar_path) for r in open_source(str(source), Settings())]
    if len(refs) != len(order):
        raise RuntimeError(f"listed {len(refs)} images under {root}, wrote {len(order)}")
    manifest = root / f"{names[0]}+{names[1]}.txt"
    manifest.write_text("".join(f"{r.source}\n" for r in refs))
    return Layout((folder, tar_path), manifest, [r.image_id for r in refs], list(order))


# --- figures -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Figure:
    """One line of the report; ``ok`` is None for a figure that is informative only."""

    key: str
    label: str
    value: Any
    ok: bool | None = None


@dataclass
class Measurement:
    title: str
    figures: list[Figure] = field(default_factory=list)

    def add(self, key: str, label: str, value: Any, ok: bool | None = None) -> None:
        self.figures.append(Figure(key, label, value, ok))

    @property
    def met(self) -> bool:
        return all(f.ok is not False for f in self.figures)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "met": self.met,
            "failed": [f.key for f in self.figures if f.ok is False],
            "figures": {f.key: f.value for f in self.figures},
        }


def render(measurements: Sequence[Measurement]) -> str:
    width = max(len(f.label) for m in measurements for f in m.figures)
    lines: list[str] = []
    for m in measurements:
        lines += ["", f"{m.title}: {'met' if m.met else 'NOT MET'}"]
        for f in m.figures:
            mark = {None: "", True: "ok", False: "FAIL"}[f.ok]
            lines.append(f"  {f.label:<{width}}  {_shown(f.value):<28} {mark}".rstrip())
    return "\n".join(lines)


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


# --- running -----------------------------------------------------------------------------------
def _cli(d: Drill, *argv: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "carnumber.cli", *argv]
    done = subprocess.run(cmd, env=d.env(), capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode not in (0, 1):  # verify's 1 is a finding; anything else stops the bench
        raise RuntimeError(f"`carnumber {' '.join(argv)}` exited {done.returncode}: {done.stderr[-2000:]}")
    return done


def run_layout(d: Drill, run_id: str, layout: Layout, each: bool, timeout_s: float) -> dict[str, Any]:
    """Enqueue ``layout`` as ``run_id`` and wait for the run to finish; calls and seconds."""
    d.run_id = run_id
    calls_before = d.server_calls()
    started = time.monotonic()
    logs = []
    for source in layout.sources if each else (layout.manifest,):
        logs.append(_cli(d, "enqueue", str(source), "--run", run_id, timeout_s=timeout_s).stderr)
    d.wait_for(f"run {run_id}", d.finished, timeout_s)
    wall_s = time.monotonic() - started
    cache_lines = [ln.split(": ", 1)[-1] for log in logs for ln in log.splitlines() if "answer cache:" in ln]
    return {"calls": d.server_calls() - calls_before, "wall_s": wall_s, "cache_log": " / ".join(cache_lines)}


def plan_calls(d: Drill, run_id: str, layout: Layout, timeout_s: float) -> int:
    """The calls `carnumber plan` says the run will make (before it is enqueued)."""
    done = _cli(d, "plan", str(layout.manifest), "--run", run_id, "--json", timeout_s=timeout_s)
    return int(json.loads(done.stdout.strip().splitlines()[-1])["calls"])


def verify(d: Drill, run_id: str, timeout_s: float) -> dict[str, Any]:
    done = _cli(d, "verify", run_id, "--json", timeout_s=timeout_s)
    return dict(json.loads(done.stdout))


@dataclass(slots=True)
class Seen:
    """One image in a run's output: its outcomes ``(status, processed_at)``, the images named in
    its ``answered_by``, and its highest ``attempts``."""

    outcomes: set[tuple[str, Any]] = field(default_factory=set)
    by: set[str | None] = field(default_factory=set)
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class Output:
    images: dict[str, Seen]
    duplicate_rows: int  # beyond the first per (image_id, plate_index)

    def check(self, layout: Layout) -> tuple[int, int, int]:
        """(images of ``layout`` with exactly one outcome and one ``answered_by``, missing,
        unexpected)."""
        expected, got = set(layout.ids), set(self.images)
        single = sum(1 for i in expected & got if len(self.images[i].outcomes) == len(self.images[i].by) == 1)
        return single, len(expected - got), len(got - expected)


def read_output(d: Drill, run_id: str) -> Output:
    rows = open_dataset(str(d.work / "out")).read_run(
        run_id, columns=["image_id", "plate_index", "status", "processed_at", "answered_by", "attempts"]
    )
    images: dict[str, Seen] = {}
    for r in rows.to_pylist():
        seen = images.setdefault(r["image_id"], Seen())
        seen.outcomes.add((r["status"], r["processed_at"]))
        seen.by.add(r["answered_by"])
        seen.attempts = max(seen.attempts, r["attempts"])
    return Output(images, duplicate_rows(rows))


def _common(m: Measurement, layout: Layout, run: dict[str, Any], out: Output, v: dict[str, Any]) -> None:
    n = len(layout.ids)
    single, missing, unexpected = out.check(layout)
    m.add("images", "images listed (folder + tar)", n)
    m.add("images_with_one_outcome", "images with exactly one outcome (Parquet)", single, single == n)
    m.add("missing", "images missing / unexpected (Parquet)", f"{missing} / {unexpected}",
          missing == 0 and unexpected == 0)  # fmt: skip
    m.add(
        "duplicate_rows",
        "duplicate (image_id, plate_index) rows",
        out.duplicate_rows,
        out.duplicate_rows == 0,
    )
    verdict = "OK" if v["ok"] else "MISMATCH: " + ", ".join(v["reasons"])
    m.add("verify", "`carnumber verify`", f"{verdict} ({v['exactly_one']}/{v['enqueued']})",
          v["ok"] and v["enqueued"] == n)  # fmt: skip
    m.add("failed", "images failed", v["failed"], v["failed"] == 0)
    m.add("wall_s", "wall time, enqueue to run done (s)", round(run["wall_s"], 2))
    m.add("images_per_s", "images/s", round(n / run["wall_s"], 1))


def measure_copies(layout: Layout, run: dict[str, Any], out: Output, v: dict[str, Any]) -> Measurement:
    m = Measurement("1. copies within one run")
    distinct = len(set(layout.pictures))
    picture_of = dict(zip(layout.ids, layout.pictures, strict=True))
    seen = out.images
    by_other = [i for i in layout.ids if i in seen and seen[i].by != {i}]
    same = all(picture_of.get(b) == picture_of[i] for i in by_other for b in seen[i].by)
    m.add("distinct_pictures", "distinct pictures / copies", f"{distinct} / {len(layout.ids) - distinct}")
    m.add("calls", "server calls accepted (= distinct pictures)", run["calls"], run["calls"] == distinct)
    _common(m, layout, run, out, v)
    copies = len(layout.ids) - distinct
    m.add("answered_by_other", "images with answered_by != image_id (= copies)", len(by_other),
          len(by_other) == copies)  # fmt: skip
    m.add("answered_by_same_picture", "... naming an image of the same picture", same, same)
    attempts = sum(s.attempts for s in seen.values())
    m.add("attempts_per_image", "attempts, summed per image (of it the copies')",
          f"{attempts} ({sum(seen[i].attempts for i in by_other)})")  # fmt: skip
    return m


def measure_moved(
    layout: Layout, first: Layout, first_out: Output, run: dict[str, Any], out: Output,
    v: dict[str, Any], cache: dict[str, Any],
) -> Measurement:  # fmt: skip
    m = Measurement("2. the same pictures under new paths, a second run")
    picture_of = dict(zip(first.ids, first.pictures, strict=True))
    paid = {i for i, s in first_out.images.items() if s.by == {i} and s.attempts >= 1}  # called itself
    seen = out.images
    from_cache = [i for i in layout.ids if i in seen and seen[i].attempts == 0 and seen[i].by <= paid]
    same = all(picture_of[b] == p for i, p in zip(layout.ids, layout.pictures, strict=True) if i in seen
               for b in seen[i].by if b in picture_of)  # fmt: skip
    m.add("calls", "server calls accepted (= 0)", run["calls"], run["calls"] == 0)
    _common(m, layout, run, out, v)
    m.add("from_cache", "answered from the cache: 0 attempts, by a paid run-1 image", len(from_cache),
          len(from_cache) == len(layout.ids))  # fmt: skip
    m.add("answered_by_same_picture", "... naming an image of the same picture", same, same)
    m.add("skipped_by_ledger", "images the ledger skipped (new paths: 0)", v["skipped_answered_earlier"])
    m.add("cache_update_s", "cache update before the enqueue (s)", round(cache["seconds"], 3))
    m.add("cache_entries", "pictures in the cache / new from files", f"{cache['entries']} / "
          f"{cache['answers_added']} from {cache['files_ingested']}")  # fmt: skip
    m.add("enqueue_cache_log", "the enqueue's own cache line", run["cache_log"])
    entries = max(1, cache["entries"])
    m.add("answers_bytes", "size of {output}/_answers/ (bytes; segments only)",
          f"{cache['bytes']} ({cache['segment_bytes']} in {cache['segments']} segment(s))")  # fmt: skip
    m.add("answers_bytes_per_picture", "bytes per cached picture (all / segments)",
          f"{cache['bytes'] / entries:.1f} / {cache['segment_bytes'] / entries:.1f}")  # fmt: skip
    return m


def update_cache(d: Drill) -> dict[str, Any]:
    from producers.answer_index import update_answers

    output = str(d.work / "out")
    started = time.monotonic()
    stats = update_answers(output)
    seconds = time.monotonic() - started
    files = [p for p in (d.work / "out" / "_answers").rglob("*") if p.is_file()]
    segments = sum(p.stat().st_size for p in files if p.suffix in (".idx", ".val", ".fence"))
    return {"seconds": seconds, "entries": stats.entries, "answers_added": stats.answers_added,
            "files_ingested": stats.files_ingested, "segments": stats.segments,
            "bytes": sum(p.stat().st_size for p in files), "segment_bytes": segments}  # fmt: skip


def _copies(args: argparse.Namespace) -> int:
    return round(args.images * args.copies) if args.copies < 1 else int(args.copies)


def bench(args: argparse.Namespace, work: Path) -> list[Measurement]:
    copies = _copies(args)
    distinct = args.images - copies
    rng = random.Random(args.seed)
    print(f"writing {args.images} images ({distinct} distinct, {copies} copies) under {work} ...", flush=True)
    bodies = distinct_pictures(work, distinct)
    order = [*range(distinct), *rng.choices(range(distinct), k=copies)]
    rng.shuffle(order)
    inputs = work / "archive"  # the harness writes no archive of its own where one exists
    first = write_layout(inputs / "run1", bodies, order, ("cameras", "upload"))
    rng.shuffle(order)
    moved = write_layout(inputs / "run2", bodies, order, ("moved", "repacked"))
    del bodies
    d = Drill(work, images=args.images, chunk_size=args.chunk_size, concurrency=args.concurrency,
              processes=args.worker_processes, latency_ms=args.latency_ms, lease_s=45.0)  # fmt: skip
    try:
        for _ in range(args.nodes):
            d.start_node()
        print(f"run 1: {args.nodes} nodes, server latency {args.latency_ms} ms ...", flush=True)
        plan1 = plan_calls(d, RUNS[0], first, args.timeout_s)
        run1 = run_layout(d, RUNS[0], first, args.enqueue == "each", args.timeout_s)
        m1 = measure_copies(first, run1, read_output(d, RUNS[0]), verify(d, RUNS[0], args.timeout_s))
        m1.add(
            "plan_calls", "`carnumber plan` beforehand: calls (= calls made)", plan1, plan1 == run1["calls"]
        )
        _cli(d, "compact", RUNS[0], timeout_s=args.timeout_s)
        print("run 2: the same pictures under new paths ...", flush=True)
        cache = update_cache(d)
        plan2 = plan_calls(d, RUNS[1], moved, args.timeout_s)
        run2 = run_layout(d, RUNS[1], moved, args.enqueue == "each", args.timeout_s)
        v2 = verify(d, RUNS[1], args.timeout_s)
        m2 = measure_moved(moved, first, read_output(d, RUNS[0]), run2, read_output(d, RUNS[1]), v2, cache)
        m2.add(
            "plan_calls", "`carnumber plan` beforehand: calls (= calls made)", plan2, plan2 == run2["calls"]
        )
        return [m1, m2]
    finally:
        d.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20_000, help="images per run, copies included")
    p.add_argument(
        "--copies", type=float, default=0.15, help="copies: a fraction of --images (below 1), or a count"
    )
    p.add_argument("--enqueue", choices=("manifest", "each"), default="manifest",
                   help="both sources in one manifest, or one `carnumber enqueue` per source")  # fmt: skip
    p.add_argument("--nodes", type=int, default=2, help="`carnumber worker` nodes")
    p.add_argument("--worker-processes", type=int, default=2, help="chunks at once per node (`worker -c`)")
    p.add_argument("--concurrency", type=int, default=32, help="call slots per node (CARNUMBER_CONCURRENCY)")
    p.add_argument("--chunk-size", type=int, default=200)
    p.add_argument("--latency-ms", type=int, default=30, help="the server's added latency per call")
    p.add_argument("--seed", type=int, default=20261201)
    p.add_argument("--timeout-s", type=float, default=1800, help="give up on any one step after this")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0 <= _copies(args) < args.images:
        parser.error(f"--images {args.images} with --copies {args.copies}: no distinct pictures left")
    work = Path(tempfile.mkdtemp(prefix="carnumber-dedup-"))
    try:
        started = time.monotonic()
        # With --json, stdout is the JSON alone: progress lines (the harness's too) go to stderr.
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            measurements = bench(args, work)
        met = all(m.met for m in measurements)
        if args.json:
            doc = {"images": args.images, "enqueue": args.enqueue, "nodes": args.nodes, "met": met,
                   "seconds": round(time.monotonic() - started, 1),
                   "load": [round(x, 2) for x in os.getloadavg()],
                   "measurements": [m.to_json() for m in measurements]}  # fmt: skip
            print(json.dumps(doc, ensure_ascii=False, indent=2))
        else:
            print(render(measurements))
            load = " ".join(f"{x:.2f}" for x in os.getloadavg())
            print(f"\n{'both measurements met' if met else 'NOT MET'}; load {load} on {os.cpu_count()} cores")
        return 0 if met else 1
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"dedup bench: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    # A SIGTERM ends the bench as Ctrl-C does: through the finally blocks, children stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
