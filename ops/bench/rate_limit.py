"""Fleet rate-limit benchmark: does the fleet hold the account's limit in *every* run, not one?

Each case runs ``--repeat`` times, each run from a fresh start: its own local server (replay
recognizer, counting exact whole seconds, in this process, with counters that keep every call's
arrival time), fresh worker nodes on one AccessKey, its own key prefix, queue and output. The
fleet is four ``carnumber worker`` nodes exactly as an operator starts them (no flags, the default
settings: threads pool with 2 chunks and 32 calls in flight per node), on two host names
(``groupA-1@hostA``, ``groupA-2@hostA``, ``groupB-1@hostB``, ``groupB-2@hostB``; node names on
this one machine), through the global limiter (``CARNUMBER_QPS``, burst 1, the product's pacing
guard). The cases (issue 22):

``a``  Q = 10, no latency.
``b``  Q = 50, 500 ms per call.
``c``  Q = 50, 500 ms, the server refusing one call in 500 at random even within the limit
       (``--throttle-random 0.002``: not counted against it, answered ``Throttling.User``).
``d``  ``CARNUMBER_QPS=10`` against a server whose real limit is 8; fidelity of the real limit
       measured from 30 s after the first call (the fleet has to find the limit first).
``e``  Q = 100, 200 ms per call (the machine's load is in the table: 4 nodes, the server and
       Redis on this machine).

Runs go round-robin (a, b, c, d, e, a, b, ...), so a change in the machine's load spreads over
the cases instead of landing on one. Each run enqueues Q x (warm-up + seconds + 10) images (never
idle) and measures a steady window of ``--seconds`` that starts ``--warmup`` s (30 s in case d)
after the first accepted call. Printed per run as it ends, then one table:

* fidelity: calls the server accepted per second in the steady window, of its real limit (Q; 8 in
  case d), min / median / max over the runs;
* throttles per run, whole run, start-up included (case c: how many were refused at random);
* the throttled share of all calls sent, whole run and steady window (case d's ``≤ 1 %``);
* the most calls sent in one whole second (what the server counts), and the 1-minute load average
  before and after the runs.

    python ops/bench/rate_limit.py --repeat 10                  # the issue's table, about 75 minutes
    python ops/bench/rate_limit.py --case a,d --repeat 2 --seconds 30    # a quick look
    python ops/bench/rate_limit.py --case b --repeat 1 --trace  # where the time goes, from inside
    python ops/bench/rate_limit.py --case celery10,celery50     # Celery's own rate_limit instead

Extra cases, only when named: ``celery10`` / ``celery50`` (``CARNUMBER_QPS=0`` and Celery's own
per-node ``rate_limit`` of Q/s, chunks of one image: what the global limiter replaces) and
``prefork`` (case b on one node with the prefork pool, 2 processes: its idle chunk ends).

Targets (issue 22, on a quiet machine): a, b every run >= 98.5 % and median >= 99 % of Q, no
throttle in at least 9 of 10 runs; c every run >= 98 %; d >= 95 % of the real limit after 30 s with
<= 1 % of calls throttled; e >= 97 %, no throttle. With ``--trace``, per run: the slots Redis
granted, wake-up lateness and slot-to-server delay (``ratelimit_probe``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from ratelimit_fleet import Case, make_archive, run_case
from ratelimit_measure import CaseResult, Spread, spread_table

from carnumber.embedded_redis import EmbeddedRedis

FLEET = ("groupA-1@hostA", "groupA-2@hostA", "groupB-1@hostB", "groupB-2@hostB")
CASES = ("a", "b", "c", "d", "e")
EXTRAS = ("celery10", "celery50", "prefork")
D_WARMUP_S = 30.0  # case d: fidelity counts from 30 s after the first call


def _issue_case(
    name: str, label: str, qps: int, args: argparse.Namespace, *, latency_ms: float = 0.0, **kw: object
) -> Case:
    fleet = tuple((node, 1) for node in FLEET)
    warmup = max(args.warmup, D_WARMUP_S) if name == "d" else args.warmup
    return Case(
        mode="limiter", qps=qps, seconds=args.seconds, warmup_s=warmup, nodes=fleet,
        concurrency=32, chunk_size=200, images=math.ceil(qps * (warmup + args.seconds + 10)),
        latency_ms=latency_ms, label=f"{name}: {label}", guard_ms=args.guard_ms, pool="default",
        **kw,  # type: ignore[arg-type]
    )


def _celery_case(qps: int, args: argparse.Namespace) -> Case:
    # Celery's rate_limit counts task messages: one image per message to compare like with like.
    fleet = tuple((node, 1) for node in FLEET)
    return Case(
        mode="celery", qps=qps, seconds=args.seconds, warmup_s=args.warmup, nodes=fleet,
        concurrency=16, chunk_size=1, images=math.ceil(qps * (args.warmup + args.seconds + 10)),
        label=f"celery{qps}: Celery rate_limit, Q = {qps}",
    )


BUILDERS: dict[str, Callable[[argparse.Namespace], Case]] = {
    "a": lambda a: _issue_case("a", "Q = 10, no latency", 10, a),
    "b": lambda a: _issue_case("b", "Q = 50, 500 ms", 50, a, latency_ms=500.0),
    "c": lambda a: _issue_case(
        "c", "Q = 50, 500 ms, 1 in 500 throttled at random", 50, a, latency_ms=500.0,
        throttle_random=0.002,
    ),
    "d": lambda a: _issue_case("d", "CARNUMBER_QPS = 10, real limit 8", 10, a, server_qps=8),
    "e": lambda a: _issue_case("e", "Q = 100, 200 ms", 100, a, latency_ms=200.0),
    "celery10": lambda a: _celery_case(10, a),
    "celery50": lambda a: _celery_case(50, a),
    "prefork": lambda a: replace(
        _issue_case("prefork", "Q = 50, 500 ms, 1 node, prefork pool", 50, a, latency_ms=500.0),
        nodes=(("latency-1@hostA", 2),), concurrency=38, pool="prefork",
    ),
}


def build_cases(args: argparse.Namespace) -> list[Case]:
    """The cases of one invocation, in the order they run within each round."""
    names = [n.strip() for n in args.case.split(",") if n.strip()]
    unknown = [n for n in names if n not in BUILDERS]
    if unknown or not names:
        raise SystemExit(
            f"--case: unknown {', '.join(unknown) or '(none given)'} (choose from "
            f"{', '.join(CASES)}; extras {', '.join(EXTRAS)})"
        )
    return [BUILDERS[n](args) for n in dict.fromkeys(names)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default=",".join(CASES),
                   help=f"comma-separated: {', '.join(CASES)} (default: all five); "
                        f"extras: {', '.join(EXTRAS)}")
    p.add_argument("--repeat", type=int, default=10, help="runs per case, each from a fresh start (10)")
    p.add_argument("--seconds", type=float, default=60.0, help="steady window per run, s (60)")
    p.add_argument("--warmup", type=float, default=5.0,
                   help=f"s after the first call before the window (5; case d: at least {D_WARMUP_S:g})")
    p.add_argument("--guard-ms", type=float, default=None,
                   help="CARNUMBER_RATE_GUARD_MS for the workers (default: the product's, 10)")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                   help="default: a private redis-server for the benchmark (REDIS_URL if set)")
    p.add_argument("--trace", action="store_true",
                   help="diagnostics: load ratelimit_probe into the workers (slot, wake-up, delivery)")
    p.add_argument("--dump", type=Path, help="write each run's call times (JSON) into this folder")
    p.add_argument("--json", type=Path, help="write every run's figures (JSON) to this file")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.seconds <= 0 or args.warmup < 0:
        p.error("--repeat must be >= 1, --seconds > 0 and --warmup >= 0")
    return args


def _line(case: Case, i: int, repeat: int, r: CaseResult, loads: tuple[float, float]) -> str:
    extra = f", {r.random_refusals} at random" if r.random_refusals else ""
    share = f", {r.throttled_share:.2%} of calls" if r.throttled else ""
    return (
        f"  {case.name} run {i + 1}/{repeat}: {r.fraction:.2%} of {r.limit} ({r.achieved_per_s:.2f}/s), "
        f"{r.throttled} throttle(s){extra}{share}; most sent in a whole s {r.max_sent}, sliding "
        f"{r.max_sent_sliding}; load {loads[0]:.2f} -> {loads[1]:.2f}"
        + (f"; throttled at {', '.join(f'{t:.1f}' for t in r.throttled_at_s[:8])} s" if r.throttled else "")
    )


def _trace_line(r: CaseResult) -> str:
    t = r.trace
    if t is None or not t.calls:
        return ""
    return (
        f"    trace: {t.calls} admissions, most slots in any 1 s {t.slots_max_1s}, unbooked "
        f"{t.idle_s:.2f} s; wake-up late p50/p99/max {t.wake_p50_ms:.1f}/{t.wake_p99_ms:.1f}/"
        f"{t.wake_max_ms:.1f} ms; slot→server p50/p99/max {t.delivery_p50_ms:.1f}/"
        f"{t.delivery_p99_ms:.1f}/{t.delivery_max_ms:.1f} ms; {t.rebooked} late re-book(s), "
        f"{t.missed} held up past send_by; on these delays a guard of "
        + ", ".join(f"{g:g}" for g, _ in t.crowding) + " ms would let "
        + ", ".join(f"{c:.2f}" for _, c in t.crowding) + " calls per minute past Q in a whole second"
    )


def run(args: argparse.Namespace) -> list[Spread]:
    cases = build_cases(args)
    results: dict[str, list[CaseResult]] = {c.name: [] for c in cases}
    loads: dict[str, list[tuple[float, float]]] = {c.name: [] for c in cases}
    work = Path(tempfile.mkdtemp(prefix="carnumber-rlbench-"))
    embedded = None
    try:
        redis_url = args.redis_url
        if not redis_url:
            embedded = EmbeddedRedis()
            redis_url = embedded.url
        make_archive(work / "archive", max(c.images for c in cases))
        for i in range(args.repeat):
            for case in cases:
                before = os.getloadavg()[0]
                print(f"[{time.strftime('%H:%M:%S')}] {case.name}, run {i + 1}/{args.repeat}: "
                      f"{case.images} images; load {before:.2f}", flush=True)
                dump = None
                if args.dump:
                    args.dump.mkdir(parents=True, exist_ok=True)
                    dump = args.dump / f"{case.name.split(':')[0]}-run{i + 1}.json"
                run_dir = work / f"{case.name.split(':')[0]}-{i}"
                r = run_case(case, work / "archive", redis_url, run_dir, log=False, dump=dump,
                             trace=args.trace)
                shutil.rmtree(run_dir, ignore_errors=True)
                pair = (before, os.getloadavg()[0])
                results[case.name].append(r)
                loads[case.name].append(pair)
                print(_line(case, i, args.repeat, r, pair), flush=True)
                if args.trace:
                    print(_trace_line(r), flush=True)
        return [Spread(c.name, results[c.name], loads[c.name]) for c in cases]
    finally:
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    load = os.getloadavg()
    spreads = run(args)
    print()
    print(spread_table(spreads))
    print(f"\nfidelity: calls accepted per second in a {args.seconds:g}-s steady window, of the "
          f"server's real limit; window from {args.warmup:g} s after the first call (case d: "
          f"{max(args.warmup, D_WARMUP_S):g} s). Load average before: {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}; after: " + " ".join(f"{x:.2f}" for x in os.getloadavg())
          + f"; {os.cpu_count()} CPUs; total {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(
            [{"case": sp.label, "loads": sp.loads, "runs": [asdict(r) for r in sp.runs]} for sp in spreads],
            indent=1, default=str,
        ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
