"""Process one chunk: resolve each image, call the API concurrently, and turn outcomes into rows.

Plain async functions over plain data; the engine (``workers/engine.py``) builds the
:class:`ChunkContext` once per process and runs :func:`process_chunk` for each chunk; the runner
hands the result to the sink. Per image: admit (``Gate``) → call (not sent if held up past the
slot's ``send_by``: admitted again) → on error ask the :class:`RetryPolicy`; backoff waits hold
neither a token nor a concurrency slot, and end early if the fleet pauses. One image's
crash becomes that image's failed row; the others carry on. While the circuit is open, images
wait for the breaker's probe. When the fleet stops (fatal error) or the quota is spent, images
not yet answered come back as ``pending``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from workers.admission import Gate
from workers.api.client import Image
from workers.api.response import Recognition
from workers.errors import (
    ApiError,
    CarnumberError,
    CircuitOpen,
    ConfigError,
    FleetStopped,
    ImageRejected,
    InputError,
    Paused,
    SlotMissed,
    TransportError,
)
from workers.message import Chunk, ImageRef
from workers.ratelimit.limiter import MAX_REBOOKS
from workers.retry import service_ok
from workers.sink.rows import Failure, failure_rows, recognition_rows
from workers.slots import Slots

__all__ = ["ChunkContext", "ChunkResult", "process_chunk"]

log = logging.getLogger(__name__)


class Recognizer(Protocol):
    async def recognize(self, image: Image, *, send_by: float = math.inf) -> Recognition: ...


class Resolver(Protocol):
    def resolve_many(self, refs: Sequence[ImageRef]) -> list[Image | CarnumberError]: ...


class Policy(Protocol):
    def decide(self, attempt: int, error: BaseException) -> Any: ...


class Fleet(Protocol):
    async def stop(self, code: str, message: str, run_id: str | None) -> None: ...


class Breaker(Protocol):
    async def record(self, ok: bool) -> None: ...


@dataclass(slots=True)
class ChunkContext:
    client: Recognizer
    resolver: Resolver
    gate: Gate
    policy: Policy
    fleet: Fleet
    breaker: Breaker
    # Calls in flight at once, shared by every chunk the process runs (``workers.engine``);
    # an older chunk's images, retries included, are served before a newer chunk's.
    slots: Slots = field(default_factory=lambda: Slots(16))
    circuit_wait_s: float = 1.0  # how often a waiting image asks an open circuit again
    on_call: Callable[[str, float], None] | None = None  # metrics: ("ok" or error code, seconds)


@dataclass(slots=True)
class ChunkResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    pending: list[ImageRef] = field(default_factory=list)
    pause: Paused | None = None
    calls: int = 0
    answered: int = 0
    failed: int = 0
    plates: int = 0


@dataclass(slots=True)
class _Outcome:
    rows: list[dict[str, Any]] | None  # None: pending
    calls: int
    pause: Paused | None = None


async def process_chunk(chunk: Chunk, ctx: ChunkContext, priority: int = 0) -> ChunkResult:
    """Every image of ``chunk`` ends as rows or as pending; never lost, never twice.
    ``priority``: the chunk's place for call slots (lower first; the engine's start order)."""
    try:
        resolved = await asyncio.to_thread(ctx.resolver.resolve_many, list(chunk.images))
    except ConfigError as exc:
        # A missing extra, endpoint or storage credential fails every image alike: stop, don't fail.
        await ctx.fleet.stop("local.config", str(exc), chunk.run_id)
        return ChunkResult(pending=list(chunk.images), pause=FleetStopped("local.config", str(exc)))
    paused = asyncio.Event()

    async def guarded(ref: ImageRef, target: Image | CarnumberError) -> _Outcome:
        try:
            return await _one(chunk.run_id, ref, target, ctx, paused, priority)
        except Exception as exc:  # a bug must cost one image, not the chunk
            log.exception("image %s crashed", ref.image_id)
            failure = Failure("local.internal", f"{type(exc).__name__}: {exc}", retryable=True)
            return _Outcome(failure_rows(chunk.run_id, ref, failure, 0), 0)

    outcomes = await asyncio.gather(
        *(guarded(r, t) for r, t in zip(chunk.images, resolved, strict=True))
    )
    result = ChunkResult()
    for ref, out in zip(chunk.images, outcomes, strict=True):
        result.calls += out.calls
        if out.rows is None:
            result.pending.append(ref)
            result.pause = result.pause or out.pause
            continue
        result.rows.extend(out.rows)
        if out.rows[0]["status"] == "failed":
            result.failed += 1
        else:
            result.answered += 1
            result.plates += sum(1 for r in out.rows if r["status"] == "ok")
    return result


async def _sleep_unless_paused(delay_s: float, paused: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(paused.wait(), timeout=delay_s)


async def _one(
    run_id: str,
    ref: ImageRef,
    target: Image | CarnumberError,
    ctx: ChunkContext,
    paused: asyncio.Event,
    priority: int,
) -> _Outcome:
    if isinstance(target, ImageRejected):
        return _Outcome(
            failure_rows(run_id, ref, Failure(target.code, target.message, False), 0), 0
        )
    if isinstance(target, InputError):
        return _Outcome(failure_rows(run_id, ref, Failure("local.input", str(target), False), 0), 0)
    if isinstance(target, CarnumberError):
        code = getattr(target, "code", "local.read")
        return _Outcome(failure_rows(run_id, ref, Failure(code, str(target), True), 0), 0)

    attempt = 0
    missed = 0  # slots in a row this attempt's request could not leave by (nothing sent)
    while True:
        if paused.is_set():
            return _Outcome(None, attempt)
        error: ApiError | TransportError | None = None
        async with ctx.slots.hold(priority):
            try:
                slot = await ctx.gate.admit()
            except CircuitOpen:
                pass  # the service looks down: wait for the breaker's probe instead of parking
            except Paused as pause:
                paused.set()
                return _Outcome(None, attempt, pause)
            else:
                # Late that often in a row: send anyway, as the limiter does for late wake-ups.
                send_by = slot.send_by if missed < MAX_REBOOKS else math.inf
                sent = time.monotonic()
                try:
                    rec = await ctx.client.recognize(target, send_by=send_by)
                except SlotMissed:
                    # Held up past the slot: sending now could crowd the service's window.
                    missed += 1
                    try:
                        await ctx.gate.abandon(slot)
                    except Paused as pause:
                        paused.set()
                        return _Outcome(None, attempt, pause)
                    continue
                except (ApiError, TransportError) as exc:
                    attempt += 1
                    missed = 0
                    error = exc
                else:
                    attempt += 1
                    await ctx.breaker.record(True)
                    if ctx.on_call:
                        ctx.on_call("ok", time.monotonic() - sent)
                    return _Outcome(recognition_rows(run_id, ref, rec, attempt), attempt)
        if error is None:
            await _sleep_unless_paused(ctx.circuit_wait_s, paused)
            continue
        if ctx.on_call:
            ctx.on_call(error.code, time.monotonic() - sent)
        decision = ctx.policy.decide(attempt, error)
        if decision.action == "stop":
            await ctx.fleet.stop(error.code, error.message, run_id)
            paused.set()
            return _Outcome(None, attempt, FleetStopped(error.code, error.message))
        ok = service_ok(error)  # throttling and bad input say nothing about the service's health
        if ok is not None:
            await ctx.breaker.record(ok)
        if decision.action == "fail":
            failure = Failure(
                decision.code,
                decision.message,
                decision.retryable,
                getattr(error, "status", None),
                getattr(error, "request_id", None),
            )
            return _Outcome(failure_rows(run_id, ref, failure, attempt), attempt)
        if error.code.startswith("Throttling"):
            await ctx.gate.limiter.on_throttled()
        await _sleep_unless_paused(decision.delay_s, paused)
