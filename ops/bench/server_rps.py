"""Requests/s of the local RecognizeCarNumber server on one core.

Starts ``python -m ocrserver`` (replay recognizer, no QPS limit) as a child pinned to one core
with ``taskset``, pins this driver process to another core, and drives the server for
``--seconds`` with an async loop of ``--concurrency`` signed calls in flight through our own
``workers.api.client.AsyncClient`` (small PNG bodies with embedded truth). Prints requests/s,
p50/p90/p99 latency and the server's own count.

    python ops/bench/server_rps.py                       # 15 s, 8 in flight, server on core 0
    python ops/bench/server_rps.py --seconds 5 --concurrency 64 --server-cpu 0 --client-cpu 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ocrserver.server import spawn_server
from ocrserver.truth import make_test_image
from workers.api.client import AsyncClient, Image
from workers.config import Credentials
from workers.errors import CarnumberError

KEY_ID, SECRET = "benchid", "benchsecret"

try:  # the driver gets more calls out of its one core on uvloop
    import uvloop

    run = uvloop.run
except ImportError:  # pragma: no cover
    run = asyncio.run


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(url: str, bodies: list[bytes], seconds: float, concurrency: int,
                warmup_s: float, server_pid: int) -> tuple[list[float], int, float, float | None]:
    """(latencies in s of the measured calls, errors, measured wall time in s, server CPU
    seconds spent in the measured window)."""
    creds = Credentials(KEY_ID, SECRET)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(limits=limits, timeout=30) as http:
        client = AsyncClient(url, creds, http)
        start = time.perf_counter()
        measure_from = start + warmup_s
        deadline = measure_from + seconds
        cpu: list[float | None] = []

        async def sample_cpu() -> None:
            await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
            cpu.append(cpu_seconds(server_pid))
            await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
            cpu.append(cpu_seconds(server_pid))

        async def loop(i: int) -> None:
            nonlocal errors
            n = i
            while (t0 := time.perf_counter()) < deadline:
                try:
                    await client.recognize(Image(body=bodies[n % len(bodies)]))
                except CarnumberError:
                    errors += 1
                t1 = time.perf_counter()
                if t0 >= measure_from:
                    latencies.append(t1 - t0)
                n += concurrency

        await asyncio.gather(sample_cpu(), *(loop(i) for i in range(concurrency)))
        wall = time.perf_counter() - measure_from
        used = cpu[1] - cpu[0] if len(cpu) == 2 and None not in cpu else None  # type: ignore[operator]
        return latencies, errors, wall, used


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured duration")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured lead-in")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="calls in flight (8: more only adds httpx pool overhead to the driver)")
    parser.add_argument("--images", type=int, default=64, help="distinct PNG bodies")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    args = parser.parse_args()

    pin = shutil.which("taskset") is not None and hasattr(os, "sched_setaffinity")
    if pin:
        os.sched_setaffinity(0, {args.client_cpu})
    bodies = [make_test_image([f"苏E{i:05d}"]) for i in range(args.images)]
    size = statistics.mean(len(b) for b in bodies)
    server_args = ["--keys", f"{KEY_ID}:{SECRET}", "--qps", "0", "--recognizer", "replay"]
    with spawn_server(server_args, cpus=[args.server_cpu] if pin else None) as server:
        driver_cpu0 = time.process_time()
        lat, errors, wall, server_cpu = run(
            drive(server.url, bodies, args.seconds, args.concurrency, args.warmup_s,
                  server.proc.pid)
        )
        driver_cpu = time.process_time() - driver_cpu0  # whole run, warm-up included
        stats = httpx.get(f"{server.url}/__carnumber/stats").json()
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    where = f"server on cpu {args.server_cpu}, driver on cpu {args.client_cpu}" if pin else "unpinned"
    print(f"local server, replay recognizer, {where}; {args.concurrency} in flight, "
          f"{size / 1024:.1f} KiB PNG bodies")
    print(f"requests/s: {len(lat) / wall:.0f}  ({len(lat)} calls in {wall:.1f} s, {errors} errors)")
    print(f"latency ms: p50 {pct(0.50):.2f}  p90 {pct(0.90):.2f}  p99 {pct(0.99):.2f}")
    print(f"server counted {stats['answers'].get('Success', 0)} successes, "
          f"max {stats['max_accepted_per_second']} in one second")
    driver_busy = driver_cpu / (wall + args.warmup_s)
    server_busy = server_cpu / wall if server_cpu else None
    print(f"driver CPU busy {100 * driver_busy:.0f}% of its core", end="")
    if server_busy is not None and server_cpu:
        print(f"; server CPU busy {100 * server_busy:.0f}% of its core, "
              f"{len(lat) / server_cpu:.0f} requests per server CPU-second")
    else:
        print()
    load = os.getloadavg()[0]
    if driver_busy > 0.85:
        print("the driver, not the server, is the limit of this figure")
    elif server_busy is not None and server_busy < 0.85:
        print(f"neither side saturated its core: the machine is shared (load average {load:.1f})")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
