"""Fleet rate-limit benchmark: does one global limit hold Q calls/s across hosts, with no throttles?

For each Q (default 10 and 50), one case after the other, each with its own local server
(``--qps Q``, replay recognizer, run in this process) and fresh worker nodes on one AccessKey:

``limiter``  four Celery worker nodes in two groups (``groupA-1@hostA``, ``groupA-2@hostA``,
             ``groupB-1@hostB``, ``groupB-2@hostB``: plain node names on this one machine, no
             network namespaces), one pool process each, ``CARNUMBER_CONCURRENCY`` 16, through our
             global GCRA limiter (``CARNUMBER_QPS=Q``, ``CARNUMBER_BURST=1``, the product's
             default pacing guard ``CARNUMBER_RATE_GUARD_MS`` = 10, so at most 99.0 % of Q),
             chunks of Q images.
``celery``   the same four nodes with ``CARNUMBER_QPS=0`` and Celery's own ``rate_limit`` of Q/s
             set on the task on every node (remote control ``rate_limit``). Celery limits task
             *messages* per node, so this mode uses chunks of ONE image to compare like with like.
``latency``  server ``--latency-ms 500`` at Q = 50 through our limiter, ONE worker node
             (``latency-1@hostA``) as an operator would run it for a slow API: the threads pool
             (``--latency-pool``, default ``threads``) with 2 pool threads in one process,
             ceil(Q x 0.5 s x 1.5) = 38 calls in flight for the process, the product's chunks of
             200. The two chunks a process runs at once share its call slots (``workers.engine``),
             so the next chunk's calls go out while the last calls of the one before are in
             flight. With ``--latency-pool prefork`` (2 processes, 38 in flight each), each
             process runs one chunk at a time and books nothing while its last calls are in
             flight: one latency lost per chunk whenever both processes end a chunk together,
             which, sharing the rate equally, they tend to.

Each case enqueues Q x (warm-up + seconds + 10) images (never idle), waits until every node
answers a ping, and measures a steady window of ``--seconds`` that starts ``--warmup`` s after the
first accepted call. The server's counters are swapped for ones that keep every call's arrival
time, so the table gives exact figures instead of the server's whole-second buckets alone:

* achieved calls/s, fraction of Q: accepted calls in the steady window / its length;
* throttled: ``Throttling.User`` answers over the whole case, start-up included;
* max in any 1-s window, whole case: *accepted* per whole wall-clock second (the server's own
  ``max_accepted_per_second``, which its limiter caps at Q), then every call that *reached* the
  server, accepted or refused, per whole second and per sliding 1-s window: what the fleet sent;
* sent calls/s: calls that reached the server in the steady window, accepted or not.

Below the table, per case: gaps between accepted calls and the time lost to long ones; with
``--trace``, from inside the workers (``ratelimit_probe``): the slots Redis granted (spacing, most
in any second), time nobody had booked, wake-up lateness and slot-to-server delay.

    python ops/bench/rate_limit.py                           # the full run, about 7 minutes
    python ops/bench/rate_limit.py --seconds 10 --qps 10     # a quick look
    python ops/bench/rate_limit.py --modes limiter --trace --dump /tmp/rl   # where time goes
    python ops/bench/rate_limit.py --modes limiter --guard-ms 0  # without the pacing guard
    python ops/bench/rate_limit.py --modes latency --latency-pool prefork   # the idle tails

The workers run the product as shipped: pacing guard (``--guard-ms`` overrides
``CARNUMBER_RATE_GUARD_MS``; 0 also turns the late checks off), httpx warmed up and start-up
objects frozen at ``worker_init``, a request not sent when it cannot start by its slot's
``send_by`` (guard - 2 ms, at least guard/2) and a waiter woken after that point giving the slot
back when it can and booking a new one.

Targets (issue "One global rate limit and call quota"): >= 99 % of Q sustained (>= 98 % in the
latency case), zero throttled responses, never more than Q + burst calls in any second.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ratelimit_fleet import Case, make_archive, run_case
from ratelimit_measure import CaseResult, markdown_table

from carnumber.embedded_redis import EmbeddedRedis

MODES = ("limiter", "celery", "latency")
FLEET = ("groupA-1@hostA", "groupA-2@hostA", "groupB-1@hostB", "groupB-2@hostB")


def build_cases(args: argparse.Namespace) -> list[Case]:
    """The cases of one invocation, in the order they run."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"--modes: unknown {', '.join(unknown)} (choose from {', '.join(MODES)})")
    suffix = f" (guard {args.guard_ms:g} ms)" if args.guard_ms is not None else ""
    common = {"seconds": args.seconds, "warmup_s": args.warmup, "guard_ms": args.guard_ms}

    def images(q: int) -> int:
        return math.ceil(q * (args.warmup + args.seconds + 10))

    fleet = tuple((name, 1) for name in FLEET[: args.nodes])
    cases: list[Case] = []
    for q in args.qps:
        if "limiter" in modes:
            cases.append(Case(mode="limiter", qps=q, nodes=fleet, concurrency=args.concurrency,
                              chunk_size=args.chunk_size or q, images=images(q),
                              label=f"limiter{suffix}", **common))
        if "celery" in modes:
            # Celery's rate_limit counts task messages: one image per message to compare like with like.
            cases.append(Case(mode="celery", qps=q, nodes=fleet, concurrency=args.concurrency,
                              chunk_size=1, images=images(q), label="celery rate_limit", **common))
    if "latency" in modes:
        q = args.latency_qps
        per_process = args.latency_concurrency or math.ceil(q * args.latency_ms / 1000.0 * 1.5)
        pool = args.latency_pool
        cases.append(Case(mode="limiter", qps=q, nodes=(("latency-1@hostA", args.latency_processes),),
                          concurrency=per_process,
                          chunk_size=args.latency_chunk_size,
                          images=images(q), latency_ms=args.latency_ms, pool=pool,
                          label=f"limiter, {args.latency_ms:g} ms latency, 1 node, {pool} pool{suffix}",
                          **common))
    return cases


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qps", type=int, nargs="+", default=[10, 50], help="Q values (default: 10 50)")
    p.add_argument("--modes", default="limiter,celery,latency", help="comma-separated: " + ", ".join(MODES))
    p.add_argument("--seconds", type=float, default=60.0, help="steady window per case, s (default 60)")
    p.add_argument("--warmup", type=float, default=5.0, help="s after the first call, not measured")
    p.add_argument("--nodes", type=int, default=4, choices=range(1, 5), help="worker nodes (default 4)")
    p.add_argument("--concurrency", type=int, default=16, help="CARNUMBER_CONCURRENCY per process")
    p.add_argument("--chunk-size", type=int, default=0, help="limiter mode; default Q")
    p.add_argument("--latency-qps", type=int, default=50)
    p.add_argument("--latency-ms", type=float, default=500.0)
    p.add_argument("--latency-pool", default="default", choices=["default", "threads", "prefork"],
                   help="the latency node's pool (default: `carnumber worker` with no flags and the "
                        "product's default settings; threads/prefork: that pool, sized by the options below)")
    p.add_argument("--latency-processes", type=int, default=2,
                   help="the latency node's --concurrency: pool threads (or processes)")
    p.add_argument("--latency-concurrency", type=int, default=0,
                   help="calls in flight per process; default Q x latency x 1.5")
    p.add_argument("--latency-chunk-size", type=int, default=200,
                   help="images per chunk (default 200, CARNUMBER_CHUNK_SIZE's default)")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                   help="default: a private redis-server for the run (REDIS_URL if set)")
    p.add_argument("--guard-ms", type=float, default=None,
                   help="CARNUMBER_RATE_GUARD_MS for the workers (default: the product's, 10): "
                        "Q calls per (1 s + guard); 0 = no guard and no late re-book")
    p.add_argument("--trace", action="store_true",
                   help="diagnostics: load ratelimit_probe into the workers (slot, wake-up, delivery)")
    p.add_argument("--dump", type=Path, help="write each case's call times (JSON) into this folder")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[CaseResult]:
    cases = build_cases(args)
    work = Path(tempfile.mkdtemp(prefix="carnumber-rlbench-"))
    embedded = None
    try:
        redis_url = args.redis_url
        if not redis_url:
            embedded = EmbeddedRedis()
            redis_url = embedded.url
        make_archive(work / "archive", max(c.images for c in cases))
        results = []
        for i, case in enumerate(cases):
            sizing = (
                "`carnumber worker` with no flags and the default settings"
                if case.pool == "default"
                else f"{case.nodes[0][1]} process(es) x {case.concurrency} in flight"
            )
            print(f"[{time.strftime('%H:%M:%S')}] case {i + 1}/{len(cases)}: {case.name}, Q={case.qps}, "
                  f"{len(case.nodes)} node(s), {sizing}, chunks of {case.chunk_size}, {case.images} images; "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
            dump = None
            if args.dump:
                args.dump.mkdir(parents=True, exist_ok=True)
                dump = args.dump / f"case-{i + 1}-{case.mode}-q{case.qps}.json"
            results.append(run_case(case, work / "archive", redis_url, work / f"case-{i}",
                                    dump=dump, trace=args.trace))
        return results
    finally:
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()
    started = time.monotonic()
    results = run(args)
    print()
    print(markdown_table(results))
    print()
    for r in results:
        g = r.gaps
        print(f"- {r.mode} Q={r.qps}: gaps between accepted calls p50 {g.p50_s * 1000:.1f} ms, "
              f"p99 {g.p99_s * 1000:.1f} ms, max {g.max_s * 1000:.0f} ms; {g.long_gaps} gap(s) > 1.5/Q "
              f"({g.lost_s:.2f} s lost)"
              + (f"; throttled at {', '.join(f'{t:.2f}' for t in r.throttled_at_s[:10])} s after "
                 "the first call" if r.throttled_at_s else ""))
        if r.trace is not None and r.trace.calls:
            t = r.trace
            print(f"  trace: {t.calls} admissions; schedule: closest slots {t.slot_gap_min_ms:.2f} ms, "
                  f"most slots in any 1 s {t.slots_max_1s}, unbooked {t.idle_s:.2f} s; wake-up late "
                  f"p50/p99/max {t.wake_p50_ms:.1f}/{t.wake_p99_ms:.1f}/{t.wake_max_ms:.1f} ms; "
                  f"slot→server p50/p99/max {t.delivery_p50_ms:.1f}/{t.delivery_p99_ms:.1f}/"
                  f"{t.delivery_max_ms:.1f} ms (spread {t.spread_ms:.1f} ms; start-up max "
                  f"{t.startup_delivery_max_ms:.1f} ms); woke→server p50/p99/max "
                  f"{t.admit_p50_ms:.1f}/{t.admit_p99_ms:.1f}/{t.admit_max_ms:.1f} ms"
                  + (f"; {t.rebooked} late re-book(s), {t.returned} slot(s) given back, "
                     f"{t.rebooked - t.returned} lost" if t.rebooked else "")
                  + (f"; {t.missed} request(s) held up past send_by, not sent" if t.missed else ""))
    print(f"\nload average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; after: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg())
          + f"; total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
