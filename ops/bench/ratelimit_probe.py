"""Benchmark-only instrumentation and experiments, loaded into the Celery workers of the rate-limit
benchmark with ``celery worker --include=ratelimit_probe`` (``ops/bench`` on ``PYTHONPATH``).
Nothing here is part of the product; each part is switched on by an environment variable that
``ops/bench/rate_limit.py`` sets from its flags, and does nothing otherwise.

``RLBENCH_TRACE_DIR`` (``--trace``): wraps ``RateLimiter.acquire`` (the slot Redis granted and when
the caller woke up) and ``AsyncClient._prepare`` (when the request was signed, and its nonce, which
the benchmark's server records with each accepted call's arrival, so admission and arrival are
matched exactly). One JSON line per call in ``RLBENCH_TRACE_DIR/<pid>.jsonl``, Unix seconds (one
machine, so Redis ``TIME`` and ``time.time()`` are the same clock).

``RLBENCH_WARM_HTTP=1`` (``--warm-http``), a proposed fix: load what httpx loads lazily on its
first request (anyio's asyncio backend: ~20 ms idle, up to ~100 ms on a busy host) in the worker's
main process before the pool forks, so a process's first call leaves right after its slot.

``RLBENCH_LATE_REBOOK_MS=N`` (``--late-rebook-ms``), a proposed fix: a caller that wakes more than
N ms after its slot does not send on it (the moment has passed; the slot is simply unused) and books
a new one, so a stalled event loop cannot deliver a call late into the next second's count.
"""

from __future__ import annotations

import contextvars
import json
import os
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["install", "warm_http"]

_NAN = float("nan")
_slot: contextvars.ContextVar[tuple[float, float, float, int] | None] = contextvars.ContextVar(
    "rlbench_slot", default=None
)
_grant: contextvars.ContextVar[Any] = contextvars.ContextVar("rlbench_grant", default=None)
_out: dict[int, TextIO] = {}


def _write(trace_dir: str, record: dict[str, Any]) -> None:
    pid = os.getpid()
    fh = _out.get(pid)
    if fh is None:
        fh = _out[pid] = (Path(trace_dir) / f"{pid}.jsonl").open("a", buffering=1, encoding="utf-8")
    fh.write(json.dumps(record) + "\n")


def install(trace_dir: str | None, late_rebook_s: float) -> None:
    """Wrap the limiter (and, when tracing, the client). Idempotent."""
    from workers.api.client import AsyncClient
    from workers.ratelimit.limiter import RateLimiter

    if getattr(RateLimiter, "_rlbench_probe", False):
        return
    reserve = RateLimiter._reserve
    acquire = RateLimiter.acquire
    prepare = AsyncClient._prepare

    async def traced_reserve(self: RateLimiter) -> Any:
        grant = await reserve(self)
        _grant.set(grant)  # awaited by acquire in the caller's task: the caller's context
        return grant

    async def traced_acquire(self: RateLimiter) -> None:
        entered = time.time()
        rebooked = 0
        while True:
            _grant.set(None)
            await acquire(self)
            grant = _grant.get()
            woke = time.time()
            slot = grant.slot_us / 1e6 if grant is not None else _NAN
            if grant is None or not late_rebook_s or woke - slot <= late_rebook_s:
                break
            rebooked += 1
        _slot.set((entered, slot, woke, rebooked))

    def traced_prepare(self: AsyncClient, image: Any) -> Any:
        req = prepare(self, image)
        admitted = _slot.get()
        _slot.set(None)
        entered, slot, woke, rebooked = admitted or (_NAN, _NAN, _NAN, 0)
        assert trace_dir is not None
        _write(trace_dir, {
            "pid": os.getpid(), "entered": entered, "slot": slot, "woke": woke,
            "rebooked": rebooked, "signed": time.time(),
            "nonce": req.headers.get("x-acs-signature-nonce"),
        })
        return req

    RateLimiter._reserve = traced_reserve  # type: ignore[method-assign]
    RateLimiter.acquire = traced_acquire  # type: ignore[method-assign]
    if trace_dir:
        AsyncClient._prepare = traced_prepare  # type: ignore[method-assign, assignment]
    RateLimiter._rlbench_probe = True  # type: ignore[attr-defined]


def warm_http() -> None:
    """Import anyio's asyncio backend now (public API: run one no-op through ``anyio.run``)."""
    import anyio

    anyio.run(anyio.sleep, 0)


def _from_env() -> None:
    trace_dir = os.environ.get("RLBENCH_TRACE_DIR") or None
    late_rebook_s = float(os.environ.get("RLBENCH_LATE_REBOOK_MS") or 0) / 1000.0
    if os.environ.get("RLBENCH_WARM_HTTP") == "1":
        warm_http()
    if trace_dir or late_rebook_s:
        install(trace_dir, late_rebook_s)


_from_env()
