"""Process one chunk: resolve each image, call the API concurrently, and turn outcomes into rows.

Plain async functions over plain data; the engine (``workers/engine.py``) builds the
:class:`ChunkContext` once per process and runs :func:`process_chunk` for each chunk; the runner
hands the result to the sink. Images already answered in the journal (``workers/books/journal.py``) are
written from it without a call, and so are pictures answered in an earlier run (the answer cache
across runs, ``workers/earlier.py``). Per other image: claim it in the journal → admit (``Gate``) →
call (not sent if held up past the slot's ``send_by``: admitted again) → journal the answer; on
error ask the :class:`RetryPolicy`. Backoff waits hold neither a token nor a concurrency slot,
and end early if the fleet pauses. One image's crash becomes that image's failed row; the others
carry on. While the circuit is open, or Redis cannot be reached (a restart, a partition; at most
``redis_outage_s``), images wait. When the fleet stops (fatal error) or the quota is spent,
images not yet answered come back as ``pending``.

An object passed by URL reaches :func:`process_chunk` as a
:class:`~workers.storage.signed.SignedObject`: its URL is signed right before each call, for that
attempt only; unless it names the checked version, the object is confirmed unchanged before its
answer is journalled under its content key (overwritten: checked again and called again). Our own
storage credentials refused (:class:`StorageCredentialsError`) stop the fleet like a fatal API
code: images pending, not failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from workers.admission import Gate, Ticket
from workers.api.client import Image
from workers.api.response import Recognition
from workers.books.journal import Answer, Held, Written
from workers.books.spill import AnswerSpill, SpilledAnswer
from workers.errors import (
    ApiError,
    CarnumberError,
    CircuitOpen,
    ConfigError,
    FleetStopped,
    ImageRejected,
    InputError,
    ObjectChanged,
    Paused,
    RedisUnavailable,
    ShuttingDown,
    SlotMissed,
    TransportError,
    UnreadableAnswer,
)
from workers.message import Chunk, ImageRef
from workers.ratelimit.limiter import MAX_REBOOKS
from workers.retry import service_ok
from workers.sink.rows import Failure, failure_rows, recognition_rows
from workers.slots import Slots
from workers.storage.signed import SignedObject

__all__ = ["ChunkContext", "ChunkResult", "process_chunk"]

log = logging.getLogger(__name__)


class Recognizer(Protocol):
    async def recognize(self, image: Image, *, send_by: float = math.inf) -> Recognition: ...


class Resolver(Protocol):
    def resolve_many(self, refs: Sequence[ImageRef]) -> Sequence[Target]: ...


Target = Image | SignedObject | CarnumberError  # what the resolver makes of one image
# How often an object may be overwritten under its calls before its image fails (retryable).
MAX_CHANGES = 3


class Policy(Protocol):
    def decide(self, attempt: int, error: BaseException, unreadable: int | None = None) -> Any: ...


class Fleet(Protocol):
    async def stop(self, code: str, message: str, run_id: str | None) -> None: ...


class Breaker(Protocol):
    async def record(self, ok: bool) -> None: ...


class Earlier(Protocol):
    async def lookup(self, run_id: str, pictures: Sequence[str]) -> dict[str, Answer]: ...


class Journal(Protocol):
    async def answers(self, run_id: str, pictures: Sequence[str]) -> dict[str, Answer]: ...
    async def claim(
        self, run_id: str, picture: str, token: str, where: tuple[str, int] | None = None
    ) -> Answer | Held | Written | None: ...
    async def record(self, run_id: str, picture: str, answer: Answer, token: str) -> bool: ...
    async def release(self, run_id: str, picture: str, token: str) -> None: ...


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
    # Metrics and the run's call count: (run id, "ok" or error code, seconds), as each call ends.
    on_call: Callable[[str, str, float], None] | None = None
    journal: Journal | None = None  # None: no journal (unit tests); every image is called
    redis_outage_s: float = 300.0  # how long an image waits for Redis before it is left pending
    # The answer cache across runs (``workers/earlier.py``); None: every picture new to the run
    # is called.
    earlier: Earlier | None = None
    # Where paid answers wait when the journal cannot take them (``workers/books/spill.py``).
    spill: AnswerSpill | None = None
    # Set by drain(): the node shuts down. Each running chunk's pause event, to wake its waits.
    draining: bool = False
    chunk_pauses: set[asyncio.Event] = field(default_factory=set)

    def drain(self) -> None:
        """Stop starting calls (on the loop): in flight ones finish, the rest come back pending."""
        self.draining = True
        for paused in self.chunk_pauses:
            paused.set()


@dataclass(slots=True)
class ChunkResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    pending: list[ImageRef] = field(default_factory=list)
    pause: Paused | None = None
    calls: int = 0
    answered: int = 0
    failed: int = 0
    plates: int = 0
    journalled: int = 0  # images written from answers already paid for, without a call
    reused: int = 0  # of those, answered by an earlier run (the cache across runs)
    # Images another holder of the chunk wrote meanwhile: no rows here, nothing pending.
    superseded: list[ImageRef] = field(default_factory=list)


@dataclass(slots=True)
class _Outcome:
    rows: list[dict[str, Any]] | None  # None: pending
    calls: int
    pause: Paused | None = None
    journalled: bool = False
    reused: bool = False
    superseded: bool = False  # the image has its outcome already (another holder wrote it)


async def process_chunk(chunk: Chunk, ctx: ChunkContext, priority: int = 0) -> ChunkResult:
    """Every image of ``chunk`` ends as rows or as pending; never lost, never twice.
    ``priority``: the chunk's place for call slots (lower first; the engine's start order).
    Once ``ctx.drain()`` is called (the node shuts down), calls in flight finish and the images
    not called yet come back pending, with :class:`ShuttingDown`."""
    if ctx.draining:
        return ChunkResult(pending=list(chunk.images), pause=ShuttingDown("the worker node is shutting down"))
    paused = asyncio.Event()
    ctx.chunk_pauses.add(paused)
    try:
        return await _process(chunk, ctx, priority, paused)
    finally:
        ctx.chunk_pauses.discard(paused)


async def _process(chunk: Chunk, ctx: ChunkContext, priority: int, paused: asyncio.Event) -> ChunkResult:
    try:
        resolved = await asyncio.to_thread(ctx.resolver.resolve_many, list(chunk.images))
    except ConfigError as exc:
        # A missing extra, endpoint or storage credential fails every image alike: stop, don't fail.
        return ChunkResult(pending=list(chunk.images), pause=await _stop_fleet(ctx, exc, chunk.run_id))
    except RedisUnavailable as exc:  # sealed URLs could not be read: the runner retries the chunk
        return ChunkResult(pending=list(chunk.images), pause=exc)
    pictures = [_picture(ref, target) for ref, target in zip(chunk.images, resolved, strict=True)]
    earlier: dict[str, Answer] = {}
    known, pause = await _waiting_out_redis(
        ctx.journal.answers if ctx.journal else None, chunk.run_id, [p for p in pictures if p], ctx, paused
    )
    if pause is None:
        # Pictures new to the run: answered in an earlier run? (content keys only: an image
        # keyed by its id was either skipped by the producer's ledger or asked for again)
        rest = list(dict.fromkeys(p for p in pictures if p and p not in known and not p.startswith("id:")))
        lookup = ctx.earlier.lookup if ctx.earlier else None
        earlier, pause = await _waiting_out_redis(lookup, chunk.run_id, rest, ctx, paused)
    if pause is not None:
        return ChunkResult(pending=list(chunk.images), pause=pause)
    token = uuid.uuid4().hex  # this execution of the chunk, as the journal's claims know it

    async def guarded(ref: ImageRef, target: Target, picture: str | None, position: int) -> _Outcome:
        try:
            where = (chunk.chunk_id, position)
            call = _Call(chunk.run_id, ref, ctx, f"{token}:{ref.image_id}", where, picture)
            return await _one(call, target, paused, priority)
        except Exception as exc:  # a bug must cost one image, not the chunk
            log.exception("image %s crashed", ref.image_id)
            failure = Failure("local.internal", f"{type(exc).__name__}: {exc}", retryable=True)
            return _Outcome(failure_rows(chunk.run_id, ref, failure, 0), 0)

    todo = [
        (ref, target, picture, position)
        for ref, target, picture, position in zip(
            chunk.images, resolved, pictures, chunk.position_of(), strict=True
        )
        if picture not in known and picture not in earlier
    ]
    called = iter(await asyncio.gather(*(guarded(*job) for job in todo)))
    result = ChunkResult()
    for ref, picture in zip(chunk.images, pictures, strict=True):
        answer = known.get(picture) if picture else None
        reused = earlier.get(picture) if picture else None
        if answer is not None:
            out = _Outcome(_answer_rows(chunk.run_id, ref, answer, picture), 0, journalled=True)
        elif reused is not None:
            out = _Outcome(_answer_rows(chunk.run_id, ref, reused, picture), 0, journalled=True, reused=True)
        else:
            out = next(called)
        result.calls += out.calls
        if out.superseded:
            result.superseded.append(ref)
            continue
        if out.rows is None:
            result.pending.append(ref)
            result.pause = result.pause or out.pause
            continue
        result.journalled += out.journalled
        result.reused += out.reused
        result.rows.extend(out.rows)
        if out.rows[0]["status"] == "failed":
            result.failed += 1
        else:
            result.answered += 1
            result.plates += sum(1 for r in out.rows if r["status"] == "ok")
    return result


def _picture(ref: ImageRef, target: Target) -> str | None:
    """The journal's key for what ``ref`` shows: its content key, else its image id; None for an
    image that will not be called (refused locally, unreadable)."""
    if isinstance(target, CarnumberError):
        return None
    return target.content_key or f"id:{ref.image_id}"


async def _stop_fleet(ctx: ChunkContext, exc: ConfigError, run_id: str) -> FleetStopped:
    """Stop every worker for a problem that concerns every image (``exc.code``, else
    ``local.config``); the images stay pending until ``carnumber resume``."""
    code = str(getattr(exc, "code", "local.config"))
    with contextlib.suppress(RedisUnavailable):
        await ctx.fleet.stop(code, str(exc), run_id)
    return FleetStopped(code, str(exc))


async def _waiting_out_redis(
    lookup: Callable[[str, Sequence[str]], Awaitable[dict[str, Answer]]] | None,
    run_id: str,
    pictures: list[str],
    ctx: ChunkContext,
    paused: asyncio.Event,
) -> tuple[dict[str, Answer], Paused | None]:
    """Answers already paid for (in the journal: a redelivered chunk, an earlier copy of a
    picture; in the cache: an earlier run), waiting out a Redis outage."""
    if lookup is None or not pictures:
        return {}, None
    since = time.monotonic()
    while True:
        try:
            return await lookup(run_id, pictures), None
        except RedisUnavailable as exc:
            if time.monotonic() - since > ctx.redis_outage_s:
                return {}, exc
            await _sleep_unless_paused(ctx.circuit_wait_s, paused)


def _answer_rows(run_id: str, ref: ImageRef, answer: Answer, picture: str | None) -> list[dict[str, Any]]:
    key, by = _content_key(picture), answer.by or ref.image_id
    # ``attempts`` counts the calls made for this image: a copy answered by another made none.
    attempts = answer.attempts if by == ref.image_id else 0
    if answer.recognition is not None:
        return recognition_rows(run_id, ref, answer.recognition, attempts, content_key=key, answered_by=by)
    err = answer.error or {}
    failure = Failure(
        str(err.get("code", "local.unknown")),
        str(err.get("message", "")),
        bool(err.get("retryable", False)),
        err.get("status"),
        err.get("request_id"),
    )
    return failure_rows(run_id, ref, failure, attempts, content_key=key, answered_by=by)


def _content_key(picture: str | None) -> str | None:
    return picture if picture and not picture.startswith("id:") else None


async def _sleep_unless_paused(delay_s: float, paused: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(paused.wait(), timeout=delay_s)


def _refusal(run_id: str, ref: ImageRef, error: CarnumberError, attempts: int = 0) -> _Outcome:
    """The one failed row of an image that is not (or no longer) called."""
    if isinstance(error, ImageRejected):
        failure = Failure(error.code, error.message, False)
    elif isinstance(error, InputError):
        failure = Failure("local.input", str(error), False)
    else:
        failure = Failure(getattr(error, "code", "local.read"), str(error), True)
    return _Outcome(failure_rows(run_id, ref, failure, attempts), attempts)


async def _one(call: _Call, target: Target, paused: asyncio.Event, priority: int) -> _Outcome:
    run_id, ref = call.run_id, call.ref
    if isinstance(target, CarnumberError):
        return _refusal(run_id, ref, target)
    try:
        return await call.run(target, paused, priority)
    finally:
        if call.claimed and not call.recorded and call.ctx.journal is not None and call.picture:
            await call.ctx.journal.release(run_id, call.picture, call.token)


@dataclass(slots=True)
class _Call:
    """The attempts for one image, with its picture's claim in the journal."""

    run_id: str
    ref: ImageRef
    ctx: ChunkContext
    token: str  # this image in this execution of the chunk
    where: tuple[str, int]  # its chunk id and position: the run's books know it by them
    picture: str | None  # the journal's key (``_picture``)
    attempt: int = 0
    unreadable: int = 0  # answers that could not be read: retried once, not once per call
    claimed: bool = False
    recorded: bool = False
    outage_since: float | None = None  # monotonic time Redis was first found unreachable
    target: Image | SignedObject | None = None  # what is called; replaced when an object changes
    changes: int = 0  # times the object was overwritten under a call

    async def _paid(self, answer: Answer) -> None:
        ctx = self.ctx
        if ctx.journal is None or not self.picture:
            return
        self.recorded = await ctx.journal.record(self.run_id, self.picture, answer, self.token)
        if not self.recorded and ctx.spill is not None:
            # Redis is away: keep the answer on disk, replayed into the journal once Redis is
            # back, so a retry of the chunk does not pay for it again.
            try:
                ctx.spill.append(SpilledAnswer(self.run_id, self.picture, answer.to_json()))
            except OSError as exc:
                log.warning("image %s: answer not spilled either (%s)", self.ref.image_id, exc)

    def _outage(self, exc: RedisUnavailable) -> _Outcome | None:
        """Wait for Redis (None), or give up after ``redis_outage_s`` (the image stays pending)."""
        now = time.monotonic()
        self.outage_since = self.outage_since or now
        if now - self.outage_since > self.ctx.redis_outage_s:
            return _Outcome(None, self.attempt, exc)
        return None

    async def _claim(self) -> _Outcome | float | None:
        """Ask the journal for the right to call: None (ours), seconds to wait (another caller
        holds the picture), or the image's outcome (answered meanwhile, or written by another
        holder of its chunk)."""
        ctx = self.ctx
        if ctx.journal is None or not self.picture:
            return None
        got = await ctx.journal.claim(self.run_id, self.picture, self.token, self.where)
        if isinstance(got, Written):
            return _Outcome(None, self.attempt, superseded=True)
        if isinstance(got, Answer):  # another image of the picture got it meanwhile
            return _Outcome(_answer_rows(self.run_id, self.ref, got, self.picture), 0, journalled=True)
        if isinstance(got, Held):
            return got.retry_s
        self.claimed = True
        return None

    async def _admit(self, paused: asyncio.Event) -> Ticket | float | _Outcome:
        """A slot to call on now; or seconds to wait before asking again (another holder's claim,
        an open circuit, Redis out of reach); or the image's outcome."""
        ctx = self.ctx
        try:
            claimed = await self._claim()
            if claimed is not None:
                return claimed
            slot = await ctx.gate.admit(self.run_id)
            # The wait for a token can outlast the claim (a long queue at the limiter, a
            # throttled account): ask again before paying, and give the slot back if the picture
            # was answered, or claimed by another caller, meanwhile.
            try:
                claimed = await self._claim()
            except RedisUnavailable:
                await ctx.gate.abandon(slot)
                raise
            if claimed is not None or ctx.draining:
                await ctx.gate.abandon(slot)
                return claimed or _Outcome(None, self.attempt, _shutting_down())
        except CircuitOpen:
            return ctx.circuit_wait_s  # the service looks down: wait for the breaker's probe
        except RedisUnavailable as exc:
            return self._outage(exc) or ctx.circuit_wait_s
        except Paused as pause:
            paused.set()
            if isinstance(pause, FleetStopped):
                # Another node's call was refused (a revoked token, a wrong key): after
                # `carnumber resume` this node signs with fresh credentials too.
                forget = getattr(ctx.client, "forget_credentials", None)
                if forget is not None:
                    forget()
            return _Outcome(None, self.attempt, pause)
        self.outage_since = None
        return slot

    async def _image(self) -> Image | CarnumberError:
        """What this attempt sends: a URL signed now (an object's: for this attempt only), or
        bytes. Errors (the store, our credentials) are returned."""
        target = self.target
        if isinstance(target, Image):
            return target
        assert target is not None
        try:
            signed = target.signed_image()  # local, ~0.17 ms: right before the call
            return signed if signed is not None else await asyncio.to_thread(target.bytes_image)
        except CarnumberError as exc:
            return exc

    async def _unchanged(self, paused: asyncio.Event) -> bool | _Outcome:
        """Before an answer is kept under the object's content key: True when what the service
        fetched was the checked object (always, for a URL bound to its version). False when it
        was overwritten meanwhile: the new version is checked and becomes the target (call
        again); or the image's outcome when that check refuses it."""
        target = self.target
        if not isinstance(target, SignedObject) or target.bound:
            return True
        try:
            if await asyncio.to_thread(target.unchanged):
                return True
        except CarnumberError:
            pass  # cannot tell: never keep it under that key
        return await self._replace(paused)

    async def _replace(self, paused: asyncio.Event) -> bool | _Outcome:
        """The object changed since it was checked: check it again and make its new version the
        target (False: call again), or return the image's outcome."""
        target = self.target
        assert isinstance(target, SignedObject)
        self.changes += 1
        if self.changes > MAX_CHANGES:
            failure = Failure("local.objectChanging", "the object was overwritten during each call", True)
            return _Outcome(failure_rows(self.run_id, self.ref, failure, self.attempt), self.attempt)
        try:
            replaced = await asyncio.to_thread(target.recheck)
        except ConfigError as exc:
            paused.set()
            return _Outcome(None, self.attempt, await _stop_fleet(self.ctx, exc, self.run_id))
        except CarnumberError as exc:
            replaced = exc
        if isinstance(replaced, CarnumberError):
            return _refusal(self.run_id, self.ref, replaced, self.attempt)
        if self.claimed and self.ctx.journal is not None and self.picture:
            with contextlib.suppress(RedisUnavailable):  # the claim expires on its own
                await self.ctx.journal.release(self.run_id, self.picture, self.token)
        self.claimed = False
        self.target, self.picture = replaced, replaced.content_key or f"id:{self.ref.image_id}"
        return False

    async def run(self, target: Image | SignedObject, paused: asyncio.Event, priority: int) -> _Outcome:
        ctx, run_id, ref = self.ctx, self.run_id, self.ref
        self.target = target
        missed = 0  # slots in a row this attempt's request could not leave by (nothing sent)
        while True:
            if paused.is_set():
                return _Outcome(None, self.attempt, _shutting_down() if ctx.draining else None)
            error: ApiError | TransportError | None = None
            wait_s = ctx.circuit_wait_s
            async with ctx.slots.hold(priority):
                if paused.is_set():  # while it waited for a call slot: do not ask for a token
                    return _Outcome(None, self.attempt, _shutting_down() if ctx.draining else None)
                slot = await self._admit(paused)
                if isinstance(slot, _Outcome):
                    return slot
                if isinstance(slot, float):
                    wait_s, slot = slot, None
                if slot is not None:
                    # Late that often in a row: send anyway, as the limiter does for late wake-ups.
                    send_by = slot.send_by if missed < MAX_REBOOKS else math.inf
                    image = await self._image()
                    if isinstance(image, CarnumberError):  # nothing sent: give the slot back
                        with contextlib.suppress(Paused):
                            await ctx.gate.abandon(slot)
                        if isinstance(image, ConfigError):
                            paused.set()
                            return _Outcome(None, self.attempt, await _stop_fleet(ctx, image, run_id))
                        if not isinstance(image, ObjectChanged):
                            return _refusal(run_id, ref, image, self.attempt)
                        replaced = await self._replace(paused)  # the bytes fallback saw a new ETag
                        if isinstance(replaced, _Outcome):
                            return replaced
                        continue
                    sent = time.monotonic()
                    try:
                        rec = await ctx.client.recognize(image, send_by=send_by)
                    except SlotMissed:
                        # Held up past the slot: sending now could crowd the service's window.
                        missed += 1
                        try:
                            await ctx.gate.abandon(slot)
                        except RedisUnavailable:
                            pass  # the token and the reservation are lost: the safe side
                        except Paused as pause:
                            paused.set()
                            return _Outcome(None, self.attempt, pause)
                        continue
                    except (ApiError, TransportError) as exc:
                        self.attempt += 1
                        missed = 0
                        error = exc
                    else:
                        self.attempt += 1
                        kept = await self._unchanged(paused)
                        if isinstance(kept, _Outcome):
                            return kept
                        if not kept:
                            continue  # overwritten under the call: its new version, called again
                        await self._paid(Answer(self.attempt, recognition=rec, by=ref.image_id))
                        with contextlib.suppress(RedisUnavailable):
                            await ctx.breaker.record(True)
                        if ctx.on_call:
                            ctx.on_call(run_id, "ok", time.monotonic() - sent)
                        rows = recognition_rows(
                            run_id, ref, rec, self.attempt, content_key=_content_key(self.picture)
                        )
                        return _Outcome(rows, self.attempt)
            if error is None:
                await _sleep_unless_paused(wait_s, paused)
                continue
            if ctx.on_call:
                ctx.on_call(run_id, error.code, time.monotonic() - sent)
            outcome = await self._after_error(error, paused)
            if outcome is not None:
                return outcome

    async def _after_error(self, error: ApiError | TransportError, paused: asyncio.Event) -> _Outcome | None:
        """Stop, fail or back off after a failed attempt; None: try again."""
        ctx, run_id, ref = self.ctx, self.run_id, self.ref
        if isinstance(error, UnreadableAnswer):
            self.unreadable += 1
        decision = ctx.policy.decide(self.attempt, error, unreadable=self.unreadable)
        if decision.action == "stop":
            with contextlib.suppress(RedisUnavailable):  # this worker has halted either way
                await ctx.fleet.stop(error.code, error.message, run_id)
            paused.set()
            return _Outcome(None, self.attempt, FleetStopped(error.code, error.message))
        ok = service_ok(error)  # throttling and bad input say nothing about the service's health
        if ok is not None:
            with contextlib.suppress(RedisUnavailable):
                await ctx.breaker.record(ok)
        if decision.action == "fail":
            failure = Failure(
                decision.code,
                decision.message,
                decision.retryable,
                getattr(error, "status", None),
                getattr(error, "request_id", None),
            )
            by: str | None = None
            if decision.journal:
                kept = await self._unchanged(paused)
                if isinstance(kept, _Outcome):
                    return kept
                if not kept:
                    return None  # a verdict on bytes that were overwritten: call for the new ones
                # The service's own verdict on this picture (bad input, an answer still unreadable
                # after its retry): paid for, and it will not change within this run.
                await self._paid(Answer(self.attempt, error=_error_doc(failure), by=ref.image_id))
                by = ref.image_id
            rows = failure_rows(
                run_id, ref, failure, self.attempt, content_key=_content_key(self.picture), answered_by=by
            )
            return _Outcome(rows, self.attempt)
        if error.code.startswith("Throttling"):
            with contextlib.suppress(RedisUnavailable):
                await ctx.gate.limiter.on_throttled()
        await _sleep_unless_paused(decision.delay_s, paused)
        return None


def _shutting_down() -> ShuttingDown:
    return ShuttingDown("the worker node is shutting down")


def _error_doc(failure: Failure) -> dict[str, Any]:
    return {
        "code": failure.code,
        "message": failure.message,
        "retryable": failure.retryable,
        "status": failure.status,
        "request_id": failure.request_id,
    }
