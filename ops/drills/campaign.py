"""A seeded fault campaign: nothing lost and nothing paid twice, whatever happens in whatever order.

    python ops/drills/campaign.py --schedules 50 --images 2000        # the campaign (resumable)
    python ops/drills/campaign.py --schedules 50 --jobs 2             # two schedules at a time
    python ops/drills/campaign.py --seed 17                           # one schedule again
    python ops/drills/campaign.py --seed 17 --show                    # only print its schedule
    python ops/drills/campaign.py --scenario nodes-replaced-then-redis-restart

In the spirit of Jepsen and of FoundationDB's simulation tests: a *generator*
(``campaign_gen.py``: seed -> schedule of timed faults and operator commands), a *runner*
(``campaign_run.py``: plays it against a real fleet — its own AOF Redis, the local server, real
``carnumber worker`` nodes, the real ``carnumber enqueue`` over an archive with bad inputs — then
finishes the run as an operator would, and records a history), and a *checker*
(``campaign_check.py``: the invariants over that history). A violation prints the seed and the
one command that plays it again. A failing seed becomes a regression test in
``tests/test_campaign.py``.

Each schedule runs in a temporary directory of its own with its own ports, key prefix and (as
root) network namespace, so ``--jobs`` runs several at once. Results go to ``--results`` (by
default a directory named after the sizes under the system's temp dir), one file per seed: the
same command again skips the seeds already done (``--fresh`` starts over) and prints the table
from all of them. Exit 1 when any schedule violated an invariant.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.drills.campaign_check import check
from ops.drills.campaign_gen import FULL, SMALL, Params, Schedule, generate, nodes_replaced_then_redis_restart
from ops.drills.campaign_run import play

__all__ = ["main", "replay_command", "run_schedule", "table"]

SCENARIOS = {"nodes-replaced-then-redis-restart": nodes_replaced_then_redis_restart}
_FLAGS = {  # Params field -> flag; every size can be set
    "images": int, "chunk_size": int, "lease_s": float, "qps": float, "latency_ms": int,
    "concurrency": int, "processes": int, "nodes_min": int, "nodes_max": int, "high_water": int,
    "redis_outage_s": float, "events_min": int, "events_max": int, "finish_s": float,
}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--seed", type=int, help="play this one schedule")
    what.add_argument(
        "--schedules", type=int, help="play this many schedules, seeds --first-seed on (default 50)"
    )
    what.add_argument("--scenario", choices=sorted(SCENARIOS), help="play a named scenario")
    p.add_argument("--first-seed", type=int, default=1)
    p.add_argument("--size", choices=["full", "small"], default="full", help="base sizes (small: the tests')")
    for name, kind in _FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=f"(default: the size's {name})")
    p.add_argument("--no-bad-inputs", action="store_true", help="an archive without the bad inputs")
    p.add_argument("--no-root", action="store_true", help="no network namespaces even as root")
    p.add_argument(
        "--jobs", type=int, default=1, help="schedules at once (each its own Redis, ports, prefix)"
    )
    p.add_argument(
        "--results", type=Path, help="where each seed's result goes (default: by sizes, in TMPDIR)"
    )
    p.add_argument("--fresh", action="store_true", help="play every seed again, even those with a result")
    p.add_argument("--show", action="store_true", help="print the schedule and stop")
    p.add_argument(
        "--recheck",
        action="store_true",
        help="check the histories in --results again (the checker changed) and print the table",
    )
    p.add_argument("--keep", action="store_true", help="keep each schedule's work directory")
    p.add_argument("--quiet", action="store_true", help="no per-op lines on the console (logs keep them)")
    return p


def params_of(args: argparse.Namespace) -> Params:
    base = SMALL if args.size == "small" else FULL
    changes: dict[str, Any] = {k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None}
    if args.no_bad_inputs:
        changes["bad_inputs"] = False
    changes["root"] = os.geteuid() == 0 and not args.no_root and shutil.which("ip") is not None
    return Params(**{**{f.name: getattr(base, f.name) for f in fields(base)}, **changes})


def replay_command(seed: int, params: Params) -> str:
    """The one command that plays ``seed`` at ``params`` again."""
    base, size = (
        (SMALL, " --size small")
        if params.images == SMALL.images and params.lease_s == SMALL.lease_s
        else (FULL, "")
    )
    flags = [
        f"--{k.replace('_', '-')} {getattr(params, k):g}"
        for k in _FLAGS
        if getattr(params, k) != getattr(base, k)
    ]
    if not params.bad_inputs:
        flags.append("--no-bad-inputs")
    if not params.root:
        flags.append("--no-root")
    return f"python ops/drills/campaign.py --seed {seed}{size}{''.join(' ' + f for f in flags)}"


def run_schedule(schedule: Schedule, keep: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Play and check one schedule; returns its result (figures, violations, replay command)."""
    tag = f"[{schedule.name}]"
    say = (lambda _: None) if quiet else (lambda line: print(f"{tag} {line}", flush=True))
    print(f"{tag} {schedule.describe()}", flush=True)
    work = Path(
        tempfile.mkdtemp(prefix=f"carnumber-campaign-{schedule.seed if schedule.seed is not None else 'x'}-")
    )
    try:
        history = play(schedule, work, say)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    figures, violations = check(history)
    replay = (
        replay_command(schedule.seed, schedule.params) if schedule.seed is not None
        else f"python ops/drills/campaign.py --scenario {schedule.name}"
    )  # fmt: skip
    result = {
        "name": schedule.name, "seed": schedule.seed, "figures": figures.to_json(),
        "violations": [v.line() for v in violations], "replay": replay, "work": str(work) if keep else None,
    }  # fmt: skip
    print(f"{tag} {_one_line(result)}", flush=True)
    for v in violations:
        print(f"{tag} VIOLATION {v.line()}\n{tag}   replay: {replay}", flush=True)
    result["history"] = history
    return result


def _one_line(r: dict[str, Any]) -> str:
    f = r["figures"]
    rec = f"{f['slowest_recovery_s']:.1f}" if f.get("slowest_recovery_s") is not None else "-"
    return (
        f"images={f['images']} missing={f['missing']} duplicated={f['duplicated']} calls={f['calls']} "
        f"pictures={f['pictures']} extra={f['extra_calls']} (bound {f['bound']}) verify_rc={f['verify_rc']} "
        f"agrees={f['verify_agrees']} slowest_recovery_s={rec} total_s={f['total_s']} "
        + ("OK" if not r["violations"] else f"FAIL ({len(r['violations'])} violations)")
    )


def table(results: list[dict[str, Any]]) -> str:
    """The campaign's table over every schedule's result."""
    figs = [r["figures"] for r in results]
    failed = [r for r in results if r["violations"]]
    events: Counter[str] = Counter()
    for f in figs:
        events.update(f["events"])
    recs = [
        (f["slowest_recovery_s"], r["name"])
        for r, f in zip(results, figs, strict=True)
        if f["slowest_recovery_s"]
    ]
    slowest = max(recs) if recs else None
    times = [f["total_s"] for f in figs if f.get("total_s")]
    kinds = Counter(v.split(":", 1)[0] for r in failed for v in r["violations"])
    total = {k: sum(f[k] for f in figs) for k in ("images", "missing", "duplicated", "unexpected")}
    extra, bound = sum(f["extra_calls"] for f in figs), sum(f["bound"] for f in figs)
    over = sum(1 for f in figs if f["calls"] > f["pictures"] + f["bound"])
    twice = sum(f["paid_twice"] for f in figs)
    seeds = ", ".join(str(r["seed"] if r["seed"] is not None else r["name"]) for r in failed)
    per = f"median {statistics.median(times):.0f} s, max {max(times):.0f} s" if times else "-"
    rows = [
        ("schedules", f"{len(results)} ({len(results) - len(failed)} passed, {len(failed)} failed)"),
        ("events by kind", ", ".join(f"{k} {n}" for k, n in sorted(events.items())) or "-"),
        ("images", f"{total['images']:,} listed"),
        ("missing", f"{total['missing']:,}"),
        ("duplicated", f"{total['duplicated']:,} (unexpected {total['unexpected']:,})"),
        ("extra calls", f"{extra:,} against a bound of {bound:,}; {over} schedules over their bound; "
                        f"{twice:,} pictures paid twice"),
        ("verify agreement", f"{sum(1 for f in figs if f['verify_agrees'])} of {len(figs)}"),
        ("nodes that died", f"{sum(f.get('node_deaths', 0) for f in figs)}"),
        ("slowest recovery", f"{slowest[0]:.1f} s ({slowest[1]})" if slowest else "-"),
        ("time per schedule", per),
        ("violations by invariant", ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none"),
        ("failing seeds", seeds or "none"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _results_dir(args: argparse.Namespace, params: Params) -> Path:
    if args.results:
        return args.results
    digest = hashlib.sha256(json.dumps(params.to_json(), sort_keys=True).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"carnumber-campaign-{params.images}-{digest}"


def _save(folder: Path, result: dict[str, Any]) -> None:
    """``seed-N.json`` (figures, violations, replay) and ``history-N.json`` (the evidence)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = result["seed"] if result["seed"] is not None else result["name"]
    history = result.pop("history", None)
    if history is not None:
        (folder / f"history-{key}.json").write_text(json.dumps(history, ensure_ascii=False))
    tmp = folder / f".seed-{key}.json"
    tmp.write_text(json.dumps(result, ensure_ascii=False, indent=1))
    tmp.rename(folder / f"seed-{key}.json")


def _child_argv(args: argparse.Namespace, seed: int, folder: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--seed", str(seed), "--size", args.size,
            "--results", str(folder), "--fresh"]  # fmt: skip
    for k in _FLAGS:
        if getattr(args, k) is not None:
            argv += ["--" + k.replace("_", "-"), str(getattr(args, k))]
    argv += [f for f, on in (("--no-bad-inputs", args.no_bad_inputs), ("--no-root", args.no_root),
                             ("--keep", args.keep)) if on]  # fmt: skip
    return argv


def _campaign(args: argparse.Namespace, params: Params) -> int:
    folder = _results_dir(args, params)
    folder.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.first_seed, args.first_seed + (args.schedules or 50)))
    todo = [s for s in seeds if args.fresh or not (folder / f"seed-{s}.json").exists()]
    print(
        f"campaign: {len(seeds)} schedules of {params.images} images, {len(seeds) - len(todo)} done "
        f"already; results in {folder}",
        flush=True,
    )
    running: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
    try:
        while todo or running:  # bounded: each child ends (its own bounds) or is killed below
            while todo and len(running) < max(1, args.jobs):
                seed = todo.pop(0)
                log = (folder / f"seed-{seed}.log").open("wb")
                running[seed] = (
                    subprocess.Popen(_child_argv(args, seed, folder), stdout=log, stderr=subprocess.STDOUT),
                    time.monotonic(),
                )
            for seed, (proc, started) in list(running.items()):
                limit = params.finish_s + params.redis_outage_s + 3 * params.horizon_s() + 900
                if proc.poll() is None and time.monotonic() - started > limit:
                    proc.send_signal(signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(120)
                    proc.kill()
                if proc.poll() is not None:
                    del running[seed]
                    done = folder / f"seed-{seed}.json"
                    line = (
                        _one_line(json.loads(done.read_text()))
                        if done.exists()
                        else f"no result (rc {proc.returncode})"
                    )
                    print(f"  seed {seed}: {line}", flush=True)
            time.sleep(1.0)
    finally:
        for proc, _ in running.values():
            proc.send_signal(signal.SIGTERM)
    results = [
        json.loads((folder / f"seed-{s}.json").read_text())
        for s in seeds
        if (folder / f"seed-{s}.json").exists()
    ]
    print(f"\ncampaign table ({len(results)} of {len(seeds)} schedules with a result, {folder})")
    print(table(results))
    for r in results:
        for v in r["violations"]:
            print(f"  seed {r['seed']}: {v.splitlines()[0]}\n    replay: {r['replay']}")
    return 0 if len(results) == len(seeds) and not any(r["violations"] for r in results) else 1


def _recheck(folder: Path) -> list[dict[str, Any]]:
    """Run the checker again over every history kept in ``folder``; rewrite the seeds' results."""
    results = []
    for path in sorted(folder.glob("history-*.json")):
        history = json.loads(path.read_text())
        figures, violations = check(history)
        kept = folder / path.name.replace("history-", "seed-")
        result = json.loads(kept.read_text()) if kept.exists() else {}
        result.update(figures=figures.to_json(), violations=[v.line() for v in violations])
        result.setdefault("name", history["schedule"]["name"])
        result.setdefault("seed", history["schedule"]["seed"])
        result.setdefault("replay", "")
        kept.write_text(json.dumps(result, ensure_ascii=False, indent=1))
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    params = params_of(args)
    if args.recheck:
        folder = _results_dir(args, params)
        results = _recheck(folder)
        print(table(results))
        for r in results:
            for v in r["violations"]:
                print(f"  {r['name']}: {v.splitlines()[0]}\n    replay: {r['replay']}")
        return 1 if any(r["violations"] for r in results) else 0
    if args.scenario:
        schedule = SCENARIOS[args.scenario]()
    elif args.seed is not None:
        schedule = generate(args.seed, params)
    else:
        return _campaign(args, params)
    if args.show:
        print(schedule.describe())
        return 0
    result = run_schedule(schedule, keep=args.keep, quiet=args.quiet)
    if args.results is not None:
        _save(args.results, result)
    return 1 if result["violations"] else 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # a SIGTERM ends the schedule through its finally blocks (children stopped)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    os._exit(130)
