"""Benchmark-only instrumentation, loaded into the Celery workers of the rate-limit benchmark with
``celery worker --include=ratelimit_probe`` (``ops/bench`` on ``PYTHONPATH``) when it runs with
``--trace``. Nothing here is part of the product, and it changes no behaviour.

``RLBENCH_TRACE_DIR``: wraps ``RateLimiter.acquire`` (the slot Redis granted for the call, when the
caller woke up, how many slots it woke too late for (the product's late re-book) and how many of
those it gave back because nobody had booked after them) and ``AsyncClient._prepare`` (when the
request was signed, and its nonce, which the benchmark's server records with each accepted call's
arrival, so admission and arrival are matched exactly) and ``httpx.AsyncClient.request`` (when the
request's last byte was written to the socket, from httpcore's ``trace`` hook). One JSON line
per call in ``RLBENCH_TRACE_DIR/<pid>.jsonl``, Unix seconds (one machine, so Redis ``TIME`` and
``time.time()`` are the same clock).

(The fixes this probe once tried from outside, a pacing guard, warming httpx up and re-booking
late slots, are now the product's own: ``CARNUMBER_RATE_GUARD_MS``, ``workers.api.client.warm_up``
at ``worker_init``, and ``RateLimiter.late_s``.)
"""

from __future__ import annotations

import contextvars
import json
import os
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["install"]

_NAN = float("nan")
_slot: contextvars.ContextVar[tuple[float, float, float, int, int] | None] = contextvars.ContextVar(
    "rlbench_slot", default=None
)
_grant: contextvars.ContextVar[Any] = contextvars.ContextVar("rlbench_grant", default=None)
_reserves: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "rlbench_reserves", default=None
)
_returned: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "rlbench_returned", default=None
)
_pending: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "rlbench_pending", default=None
)
_out: dict[int, TextIO] = {}


def _write(trace_dir: str, record: dict[str, Any]) -> None:
    pid = os.getpid()
    fh = _out.get(pid)
    if fh is None:
        fh = _out[pid] = (Path(trace_dir) / f"{pid}.jsonl").open("a", buffering=1, encoding="utf-8")
    fh.write(json.dumps(record) + "\n")


def install(trace_dir: str) -> None:
    """Wrap the limiter and the client. Idempotent."""
    import httpx

    from workers.api.client import AsyncClient
    from workers.errors import SlotMissed
    from workers.ratelimit.limiter import RateLimiter

    if getattr(RateLimiter, "_rlbench_probe", False):
        return
    reserve = RateLimiter._reserve
    acquire = RateLimiter.acquire
    return_late = RateLimiter._return_late
    prepare = AsyncClient._prepare
    request = httpx.AsyncClient.request

    async def traced_reserve(self: RateLimiter) -> Any:
        grant = await reserve(self)
        # Awaited by acquire in the caller's task: the caller's context. The last one is the slot
        # the call goes out on; earlier ones were left unused by a late wake-up.
        _grant.set(grant)
        count = _reserves.get()
        if count is not None:
            count[0] += 1
        return grant

    async def traced_return_late(self: RateLimiter, grant: Any) -> bool:
        returned = await return_late(self, grant)
        count = _returned.get()
        if count is not None and returned:
            count[0] += 1
        return returned

    async def traced_acquire(self: RateLimiter) -> Any:
        entered = time.time()
        _grant.set(None)
        count = [0]
        _reserves.set(count)
        given_back = [0]
        _returned.set(given_back)
        admitted = await acquire(self)
        grant = _grant.get()
        woke = time.time()
        slot = grant.slot_us / 1e6 if grant is not None else _NAN
        _slot.set((entered, slot, woke, max(0, count[0] - 1), given_back[0]))
        return admitted

    def traced_prepare(self: AsyncClient, image: Any, *used: Any) -> Any:
        req = prepare(self, image, *used)
        admitted = _slot.get()
        _slot.set(None)
        entered, slot, woke, rebooked, returned = admitted or (_NAN, _NAN, _NAN, 0, 0)
        _pending.set({
            "pid": os.getpid(), "entered": entered, "slot": slot, "woke": woke,
            "rebooked": rebooked, "returned": returned, "signed": time.time(),
            "nonce": req.headers.get("x-acs-signature-nonce"), "written": _NAN,
        })
        return req

    def written(product_hook: Any) -> Any:
        async def hook(event: str, info: Any) -> None:
            if product_hook is not None:  # the client's send deadline, which may refuse to send
                await product_hook(event, info)
            # httpcore's trace hook: the request's last byte went to the socket.
            record = _pending.get()
            if record is not None and event == "http11.send_request_body.complete":
                record["written"] = time.time()

        return hook

    async def traced_request(self: httpx.AsyncClient, *args: Any, **kwargs: Any) -> Any:
        if _pending.get() is None:
            return await request(self, *args, **kwargs)
        extensions = dict(kwargs.get("extensions") or {})
        extensions["trace"] = written(extensions.get("trace"))
        kwargs["extensions"] = extensions
        try:
            return await request(self, *args, **kwargs)
        except SlotMissed:
            record = _pending.get()
            if record is not None:
                record["missed"] = True  # not sent: its slot passed while it was held up
            raise
        finally:
            record = _pending.get()
            _pending.set(None)
            if record is not None:
                _write(trace_dir, record)

    RateLimiter._reserve = traced_reserve  # type: ignore[method-assign]
    RateLimiter.acquire = traced_acquire  # type: ignore[method-assign]
    RateLimiter._return_late = traced_return_late  # type: ignore[method-assign]
    AsyncClient._prepare = traced_prepare  # type: ignore[method-assign, assignment]
    httpx.AsyncClient.request = traced_request  # type: ignore[method-assign]
    RateLimiter._rlbench_probe = True  # type: ignore[attr-defined]


def _from_env() -> None:
    trace_dir = os.environ.get("RLBENCH_TRACE_DIR") or None
    if trace_dir:
        install(trace_dir)


_from_env()
