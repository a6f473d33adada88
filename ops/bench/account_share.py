"""Two RAM users' keys of one account, each with its own worker process, against a server that
limits the *account*: calls/s and throttles with and without ``CARNUMBER_ACCOUNT``.

The local server runs in this process with ``--qps Q`` and ``accounts`` grouping both keys into
one account (as the real service does for RAM users of one main account). Per case, two child
processes (one per key, "team A" and "team B") each run the real worker path
(:class:`workers.runner.Runtime`, :func:`workers.runner.execute_chunk`: limiter, quota, retries,
Parquet) over their own ``--images`` images in chunks of ``--chunk-size``, all at once:

``per-key``   ``CARNUMBER_ACCOUNT`` unset: each key is its own limit group, so the pair is
              admitted 2 × Q and the server refuses the excess; the adaptive back-off then slows
              each key down.
``account``   ``CARNUMBER_ACCOUNT`` set to the same label on both: one limit, one quota.

Reported per case: calls accepted, ``Throttling.User`` answers, the most accepted in any whole
second, and the steady rate (accepted calls in the whole seconds between the first and the last,
divided by their number) as calls/s and as a fraction of Q.

    python ops/bench/account_share.py                    # Q = 10, 500 images per key
    python ops/bench/account_share.py --images 100       # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"ram-team-a": "secret-a", "ram-team-b": "secret-b"}


def child(folder: str, chunk_size: int) -> dict[str, Any]:
    """One worker process: every image in ``folder`` through execute_chunk, chunk by chunk."""
    from workers.config import Settings
    from workers.message import Chunk, ImageRef
    from workers.runner import Runtime, execute_chunk

    settings = Settings.from_env()
    refs = [ImageRef(p.as_uri()) for p in sorted(Path(folder).iterdir())]
    calls = answered = failed = 0
    started = time.perf_counter()
    with Runtime.from_settings(settings) as rt:
        run_id = f"share-{uuid.uuid4().hex[:8]}"
        for k in range(0, len(refs), chunk_size):
            chunk = Chunk(run_id, f"{k // chunk_size:07d}", tuple(refs[k : k + chunk_size]))
            result = execute_chunk(chunk, rt)
            calls += result.calls
            answered += result.answered
            failed += result.failed
    return {
        "calls": calls,
        "answered": answered,
        "failed": failed,
        "seconds": round(time.perf_counter() - started, 2),
    }


def make_images(folder: Path, n: int, team: str) -> None:
    from ocrserver.truth import make_test_image

    folder.mkdir(parents=True)
    for i in range(n):
        data = make_test_image([{"text": f"苏E{i:05d}", "type": "小型汽车"}])
        (folder / f"{team}-{i:05d}.png").write_bytes(data)


def run_case(
    name: str, account: str | None, qps: int, images: dict[str, Path], chunk: int, redis_url: str
) -> dict[str, Any]:
    import httpx

    from ocrserver.config import ServerConfig
    from ocrserver.server import start_server

    keys = ",".join(f"{k}:{s}" for k, s in KEYS.items())
    grouping = ",".join(f"{k}=main-account" for k in KEYS)
    prefix = f"acctbench-{uuid.uuid4().hex[:8]}"
    with (
        tempfile.TemporaryDirectory(prefix="cn-acct-") as out,
        start_server(ServerConfig(qps=qps, keys=keys, accounts=grouping)) as srv,
    ):
        procs = []
        for key_id, secret in KEYS.items():
            env = {
                **os.environ,
                "REDIS_URL": redis_url,
                "CARNUMBER_ENDPOINT": srv.url,
                "ALIBABA_CLOUD_ACCESS_KEY_ID": key_id,
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET": secret,
                "CARNUMBER_KEY_PREFIX": prefix,
                "CARNUMBER_OUTPUT": f"{out}/{key_id}",
                "CARNUMBER_QPS": str(qps),
                "CARNUMBER_CONCURRENCY": "16",
                "CARNUMBER_MAX_ATTEMPTS": "10",
            }
            env.pop("CARNUMBER_ACCOUNT", None)
            if account:
                env["CARNUMBER_ACCOUNT"] = account
            cmd = [sys.executable, __file__, "--child", str(images[key_id]), "--chunk-size", str(chunk)]
            procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True))
        outs = []
        for p in procs:
            stdout, _ = p.communicate(timeout=1800)
            if p.returncode != 0:
                raise SystemExit(f"{name}: a worker failed (exit {p.returncode})")
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
        stats = httpx.get(f"{srv.url}/__carnumber/stats").json()
    _cleanup(redis_url, prefix)
    per_second = sorted((int(s), n) for s, n in stats["accepted_per_second"].items())
    inner = per_second[1:-1] or per_second
    span = inner[-1][0] - inner[0][0] + 1 if inner else 1
    rate = sum(n for _, n in inner) / span
    return {
        "case": name,
        "CARNUMBER_ACCOUNT": account or "(unset)",
        "qps": qps,
        "images": sum(o["answered"] + o["failed"] for o in outs),
        "failed": sum(o["failed"] for o in outs),
        "calls_accepted": stats["accepted_total"],
        "throttled": stats["throttled"],
        "max_accepted_in_a_second": stats["max_accepted_per_second"],
        "steady_calls_per_s": round(rate, 2),
        "fraction_of_q": round(rate / qps, 3),
        "wall_s": max(o["seconds"] for o in outs),
    }


def _cleanup(redis_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qps", type=int, default=10)
    parser.add_argument("--images", type=int, default=500, help="per key")
    parser.add_argument("--chunk-size", type=int, default=50)
    parser.add_argument("--cases", default="per-key,account")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        print(json.dumps(child(args.child, args.chunk_size)))
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="cn-acct-img-") as tmp:
        images = {}
        for key_id in KEYS:
            images[key_id] = Path(tmp) / key_id
            make_images(images[key_id], args.images, key_id)
        for case in args.cases.split(","):
            account = "main-account-1234567890" if case == "account" else None
            results.append(run_case(case, account, args.qps, images, args.chunk_size, args.redis_url))
            print(json.dumps(results[-1]), file=sys.stderr)
    cols = list(results[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
