"""Rotating credentials drill: a fleet on STS tokens that expire every 30 s, for 5 minutes.

    python ops/drills/credentials.py                         # 5 min, 30 s tokens, 2 nodes, Q = 20
    python ops/drills/credentials.py --duration-s 60 --token-s 10
    python ops/drills/credentials.py --only revoke

Real ``carnumber worker`` nodes get no AccessKey at all, only
``ALIBABA_CLOUD_CREDENTIALS_URI`` pointing at the local server's own STS on loopback
(``GET /__carnumber/sts/credentials``, ``ocrserver/sts.py``), which hands out a new temporary key
valid ``--token-s`` seconds on every request and refuses an expired one with
``InvalidSecurityToken.Expired``, as Alibaba Cloud's gateway does.

1. ``rotate``: a run of ``qps x duration`` images at ``CARNUMBER_QPS`` (so it lasts about
   ``--duration-s``). Targets: every image exactly once, 0 failed images, 0 fleet stops, and
   0 calls refused as expired (tokens are renewed before they expire, not after).
2. ``revoke``: mid-run, every token issued so far is revoked for real
   (``POST /__carnumber/sts/revoke``). Targets: the fleet stops (``invalidStsToken``) within
   seconds, with 0 images failed (the rest stay pending); ``carnumber resume`` then finishes the
   run on fresh tokens, every image exactly once.

Both also check that no node log holds a temporary AccessKeyId or token. Prints one line of
figures per drill; exits 1 when one misses a target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.drills.harness import KEY_ID, Audit, Drill, audit, drill_dir

__all__ = ["Result", "main", "revoke", "rotate", "rotating_drill"]

ACCOUNT = "drill-account"
# What a temporary AccessKeyId or token of the local STS looks like (never in a log).
_SECRET_SHAPES = re.compile(r"STS\.[0-9a-f]{24}|v1\.[A-Za-z0-9_-]{40,}\.[A-Za-z0-9_-]{20,}")


@dataclass
class Result:
    drill: str
    audit: Audit
    failed: int
    stops: int
    stop_code: str | None
    tokens_issued: int
    expired_answers: int
    leaked: int
    total_s: float
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        a = self.audit
        exact = a.missing == 0 and a.duplicated == 0 and self.failed == 0 and self.leaked == 0
        if self.drill == "rotate":
            return exact and self.stops == 0 and self.expired_answers == 0 and self.tokens_issued > 1
        return exact and self.stop_code == "invalidStsToken" and self.notes.get("stop_s", 1e9) < 15

    def line(self) -> str:
        a = self.audit
        extra = " ".join(f"{k}={v}" for k, v in self.notes.items())
        return (
            f"{self.drill:7s} images={a.archive} output={a.in_output} missing={a.missing} "
            f"duplicated={a.duplicated} failed={self.failed} fleet_stops={self.stops}"
            f"{f' ({self.stop_code})' if self.stop_code else ''} tokens_issued={self.tokens_issued} "
            f"expired_answers={self.expired_answers} calls={a.calls} leaked_secrets={self.leaked} "
            f"{extra} total_s={self.total_s:.1f} {'OK' if self.ok else 'MISS'}"
        )


def rotating_drill(work: Path, images: int, qps: int, token_s: int, latency_ms: int = 30) -> Drill:
    """A drill whose nodes have only a credentials URI (``token_s`` tokens), Q = ``qps``."""
    d = Drill(work, images=images, chunk_size=50, concurrency=8, latency_ms=latency_ms)
    d.extra_env.update({
        # No AccessKey: the chain finds the credentials URI (empty values count as unset).
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "",
        "ALIBABA_CLOUD_CREDENTIALS_URI":
            f"{d.server.url}/__carnumber/sts/credentials?key={KEY_ID}&duration_s={token_s}",
        "CARNUMBER_ACCOUNT": ACCOUNT,  # a temporary AccessKeyId cannot key the account's limit
        "CARNUMBER_QPS": str(qps),
    })  # fmt: skip
    return d


def _server_stats(d: Drill) -> dict[str, Any]:
    return dict(httpx.get(f"{d.server.url}/__carnumber/stats", timeout=10).json())


def _stop_flag(d: Drill) -> dict[str, Any] | None:
    from workers.config import Settings
    from workers.fleet import FleetControl

    async def read() -> dict[str, Any] | None:
        import redis.asyncio as aredis

        client = aredis.Redis.from_url(d.redis.url)
        try:
            fleet = FleetControl.from_settings(client, Settings(key_prefix=d.prefix, account=ACCOUNT))
            return await fleet.status()
        finally:
            await client.aclose()

    return asyncio.run(read())


def _leaks(d: Drill) -> int:
    found = 0
    for path in [*(n.log for n in d.nodes), d.work / "producer.log"]:
        with contextlib.suppress(OSError):
            found += len(_SECRET_SHAPES.findall(path.read_text(errors="replace")))
    return found


def _result(name: str, d: Drill, started: float, notes: dict[str, Any]) -> Result:
    stats = _server_stats(d)
    answers = stats.get("answers", {})
    flag = _stop_flag(d)
    summary = d.summary()
    failed = int(summary.fields.get("images_failed", 0)) if summary else -1
    return Result(
        name, audit(d), failed, int(notes.pop("stops", 1 if flag else 0)),
        notes.pop("stop_code", flag["code"] if flag else None), int(stats.get("sts_issued", 0)),
        int(answers.get("InvalidSecurityToken.Expired", 0)), _leaks(d), time.monotonic() - started,
        notes,
    )  # fmt: skip


def rotate(d: Drill, nodes: int = 2, timeout_s: float = 1800.0) -> Result:
    started = time.monotonic()
    for _ in range(nodes):
        d.start_node()
    producer = d.start_producer()
    d.wait_for("run finished", lambda s: d.finished(s) or _stop_flag(d) is not None, timeout_s)
    producer.wait(60)
    run_s = time.monotonic() - started
    return _result("rotate", d, started, {"run_s": round(run_s, 1)})


def revoke(d: Drill, nodes: int = 2, timeout_s: float = 900.0) -> Result:
    started = time.monotonic()
    for _ in range(nodes):
        d.start_node()
    producer = d.start_producer()
    d.wait_for("a third written", lambda s: s.written >= d.images // 3, timeout_s)
    httpx.post(f"{d.server.url}/__carnumber/sts/revoke?key={KEY_ID}", timeout=10).raise_for_status()
    revoked_at = time.monotonic()
    flag = None
    while flag is None and time.monotonic() - revoked_at < 60:
        time.sleep(0.2)
        flag = _stop_flag(d)
    stop_s = time.monotonic() - revoked_at
    summary = d.summary()
    failed_at_stop = int(summary.fields.get("images_failed", 0)) if summary else -1
    print(f"  revoked: fleet stopped after {stop_s:.1f} s ({flag and flag['code']}); "
          f"{summary and summary.written} written, {failed_at_stop} failed", flush=True)  # fmt: skip
    producer.wait(timeout_s)
    # The operator resumes once the fleet has stopped: every chunk parked, no call in flight
    # (a call signed with a revoked token and answered after the resume would stop it again).
    d.wait_for("every chunk parked", lambda s: s.outstanding == 0, timeout_s)
    time.sleep(2)
    # The operator's fix is a new token (the URI already hands them out): resume the run.
    resumed = subprocess.run(
        [sys.executable, "-m", "carnumber.cli", "resume", d.run_id], env=d.env(),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if resumed.returncode != 0:
        raise RuntimeError(f"carnumber resume failed: {resumed.stderr[-1500:]}")
    d.wait_for("run finished after resume", d.finished, timeout_s)
    notes = {
        "stop_s": round(stop_s, 1), "failed_at_stop": failed_at_stop,
        "stops": 1 if flag else 0, "stop_code": flag["code"] if flag else None,
    }  # fmt: skip
    return _result("revoke", d, started, notes)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["rotate", "revoke"], action="append")
    p.add_argument("--duration-s", type=int, default=300, help="how long the rotate run lasts")
    p.add_argument("--token-s", type=int, default=30, help="lifetime of each temporary key")
    p.add_argument("--qps", type=int, default=20, help="CARNUMBER_QPS: images = qps x duration")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the drill's directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    results: list[Result] = []
    for name in args.only or ["rotate", "revoke"]:
        work = drill_dir(f"credentials-{name}")
        images = args.qps * (args.duration_s if name == "rotate" else max(30, args.duration_s // 5))
        print(f"{name}: {images} images at Q={args.qps}, tokens of {args.token_s} s, "
              f"{args.nodes} nodes, in {work}", flush=True)  # fmt: skip
        d = rotating_drill(work, images, args.qps, args.token_s)
        try:
            results.append((rotate if name == "rotate" else revoke)(d, args.nodes))
        finally:
            d.close()
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        print(results[-1].line(), flush=True)
    print("\nsummary")
    for r in results:
        print("  " + r.line())
    return 0 if all(r.ok for r in results) else 1


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    os._exit(130)
