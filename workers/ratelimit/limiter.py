"""One rate limit shared by every worker of an account: ``await limiter.acquire()`` before each call.

The limit is a GCRA (:mod:`workers.ratelimit.gcra`) whose state lives in the backend under the
caller's key, so every process using the same key and Redis shares it, and two keys are two
independent limits. ``acquire`` reserves a slot in one backend step and sleeps until it: no
polling, one round trip per admission. Inside one process the waiters queue in arrival order and
only the head holds a reservation, so a process never books more than one slot ahead (a throttle
takes effect within one slot per process, and a cancelled waiter wastes nothing).

Delivery lateness: slots are paced ``guard_s`` slower than ``qps`` per second, so a call may reach
the service up to ``guard_s`` after its slot without crowding any one-second window; a waiter that
wakes more than ``late_s`` after its slot does not send on it: it gives the slot back when nobody
booked after it and books a new one. What follows the wake-up (the admission's other checks,
signing, the HTTP client's own work, a stall of the process) is covered by the :class:`Slot`'s
``send_by``: the client checks it just before the request's first byte goes out and, when it has
passed, sends nothing (:meth:`RateLimiter.abandon`, then a new slot). See
``ops/design/rate-limit.md``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from workers.errors import CarnumberError, ConfigError
from workers.ratelimit.adapt import HELD, LONE, PPM, Reaction
from workers.ratelimit.backend import Backend, RateState
from workers.ratelimit.gcra import Grant, Rate

__all__ = [
    "MAX_REBOOKS",
    "SEND_MARGIN_S",
    "RateLimiter",
    "Slot",
    "default_late_s",
    "default_send_late_s",
]

log = logging.getLogger(__name__)

# Consecutive late wake-ups (or requests that missed their ``send_by``, in the pipeline) after
# which a caller sends anyway: a loop that late every time is overloaded, and a process that
# never sends helps nobody (a throttle, if any, slows the fleet).
MAX_REBOOKS = 3

# Seconds between two warnings that throttles repeat (the ones between are logged at INFO).
WARN_EVERY_S = 600.0

# What the guard must still cover after the request's last check (``Slot.send_by``), seconds:
# writing the request and its trip to the service's counter. Measured on loopback, written to
# counted p50 0.5 ms, p99 0.9-1.7 ms (``ops/design/rate-limit.md``).
SEND_MARGIN_S = 0.002


def default_send_late_s(guard_s: float) -> float:
    """How long after its slot a request may still start onto the wire, seconds: the guard less
    :data:`SEND_MARGIN_S`, never less than half the guard; ``inf`` (no deadline) without one."""
    if guard_s <= 0:
        return math.inf
    return max(guard_s / 2, guard_s - SEND_MARGIN_S)


@dataclass(frozen=True, slots=True)
class Slot:
    """One admission. ``send_by``: the latest moment, on this host's monotonic clock (the event
    loop's ``time()``), at which the request may start onto the wire (``inf``: any time);
    ``grant``: the reservation, to give back if the request is not sent (``None``: unlimited)."""

    send_by: float = math.inf
    grant: Grant | None = None


def default_late_s(guard_s: float) -> float:
    """The default ``late_s`` for a pacing guard, seconds: the send deadline's own allowance
    (:func:`default_send_late_s`). A waiter woken later than that cannot send on its slot
    anyway, so it gives the slot back and books another at once instead of signing a request
    first; one woken earlier goes on, and the request's check at the write covers what follows.
    0 (no re-book) without a guard."""
    if guard_s <= 0:
        return 0.0
    return default_send_late_s(guard_s)


class RateLimiter:
    """At most ``qps * t + burst`` admissions in any ``t`` seconds across all users of ``key``.

    ``qps == 0`` means unlimited (no backend calls at all). :meth:`on_throttled` lowers the shared
    rate in proportion (``reaction``, :class:`~workers.ratelimit.adapt.Reaction`): a lone throttle
    by a few % for about a second, repeated ones towards the service's real limit.

    ``guard_s`` (seconds, 0 <= g < 1) paces ``qps`` calls per ``1 + guard_s`` s, so a call that
    reaches the service up to ``guard_s`` after its slot still leaves at most ``qps + burst - 1``
    in every 1-s window (the cost: ``guard / (1 + guard)`` of the rate). ``late_s`` (seconds,
    default :func:`default_late_s`, 0 = off): a waiter that wakes later than this after its slot
    does not send on it; it gives the slot back if nobody booked after it (counted in
    :attr:`late_returned`; the fleet's schedule is then not pushed out) and books a new one (at
    most :data:`MAX_REBOOKS` times in a row; counted in :attr:`late_rebooks`). Lateness is
    measured on this host's monotonic clock from when the reservation's answer arrived (see
    :meth:`acquire`). ``send_late_s`` (seconds, default :func:`default_send_late_s`, ``inf`` =
    none): how long after its slot a request may still start onto the wire; the returned
    :class:`Slot` carries the deadline, and a request that misses it is not sent
    (:meth:`abandon`; counted in :attr:`abandoned`).
    An instance belongs to one event loop at a time (a worker process keeps one on its engine's
    loop, ``workers.engine``; it is cheap to build one per loop).
    Raises :class:`~workers.errors.ConfigError` for bad arguments.
    """

    def __init__(
        self,
        backend: Backend,
        key: str,
        qps: float,
        burst: int = 1,
        *,
        reaction: Reaction | None = None,
        guard_s: float = 0.0,
        late_s: float | None = None,
        send_late_s: float | None = None,
    ) -> None:
        self.backend = backend
        self.key = key
        self.adapt_key = f"{key}:adapt"  # == Keys.rate_adapt(account) for key == Keys.rate(account)
        self.rate = Rate(qps, burst, guard_s, reaction or Reaction())
        self.late_s = default_late_s(self.rate.guard_s) if late_s is None else late_s
        if not (math.isfinite(self.late_s) and self.late_s >= 0):
            raise ConfigError(f"late_s must be >= 0 (0 = off), got {late_s}")
        self.send_late_s = default_send_late_s(self.rate.guard_s) if send_late_s is None else send_late_s
        if math.isnan(self.send_late_s) or self.send_late_s < 0:
            raise ConfigError(f"send_late_s must be >= 0 (inf = no deadline), got {send_late_s}")
        self.late_rebooks = 0  # slots this limiter's waiters woke too late for and did not use
        self.late_returned = 0  # of those, slots given back (nobody had booked after them)
        self.abandoned = 0  # slots whose request could not leave by ``send_by`` (see ``abandon``)
        self.abandoned_returned = 0  # of those, slots given back
        self._gate: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self._warned_at = -math.inf  # monotonic time of the last "throttles repeat" warning
        self._background: set[asyncio.Task[object]] = set()

    def __repr__(self) -> str:
        return (
            f"RateLimiter(key={self.key!r}, qps={self.rate.qps}, burst={self.rate.burst}, "
            f"guard_s={self.rate.guard_s})"
        )

    async def acquire(self) -> Slot:
        """Wait until this caller may send one request (on a slot it woke for within ``late_s``,
        see the class) and return the :class:`Slot`, whose ``send_by`` is the slot plus
        ``send_late_s``. Cancellation-safe: a cancelled waiter is not admitted, and its reserved
        slot is given back when no later one was booked.
        Raises :class:`~workers.errors.Paused` when the backend is unreachable.

        Lateness is ``now - (answered + wait_s)``, ``answered`` being this host's monotonic time
        right after the reservation's answer arrived. The backend computed ``wait_s`` at its own
        ``now``, which lies between sending and ``answered``, so ``answered + wait_s`` is the slot
        plus the answer's one-way trip back (and the loop's delay resuming this task): lateness
        is under-stated by that much, typically well under 1 ms, which the guard's margin below
        ``late_s`` (:data:`SEND_MARGIN_S`) leaves room for. Measuring from *before* sending instead
        over-states it by the whole round trip (p99 2.4 ms on a loaded box), which made waiters
        woken on time give up good slots."""
        if self.rate.unlimited:
            return Slot()
        loop = asyncio.get_running_loop()
        async with self._local_queue():
            for rebooks in range(MAX_REBOOKS + 1):
                grant = await self._reserve()
                due = loop.time() + grant.wait_s  # the slot, as seen from here (see above)
                if grant.wait_s > 0:
                    try:
                        await asyncio.sleep(grant.wait_s)
                    except asyncio.CancelledError:
                        self._in_background(self._give_back(grant))
                        raise
                lateness_s = loop.time() - due
                if self.late_s <= 0 or lateness_s <= self.late_s:
                    return Slot(due + self.send_late_s, grant)
                if rebooks == MAX_REBOOKS:
                    log.warning(
                        "rate limit %s: woke %.1f ms after the slot %d times in a row (event "
                        "loop overloaded?); sending anyway",
                        self.key,
                        lateness_s * 1000,
                        rebooks + 1,
                    )
                    return Slot(math.inf, grant)
                # The moment has passed: the slot is not used (slower, never faster). Given back
                # first, so when nobody booked after it the new reservation takes its place at
                # once instead of pushing the fleet's schedule out by one slot.
                self.late_rebooks += 1
                returned = await self._return_late(grant)
                log.debug(
                    "rate limit %s: woke %.1f ms late, slot %s, booking again",
                    self.key,
                    lateness_s * 1000,
                    "given back" if returned else "lost",
                )
        raise AssertionError("unreachable: the last pass returns")

    async def abandon(self, slot: Slot) -> None:
        """The request admitted on ``slot`` was not sent (it missed ``send_by``): give the slot
        back when nobody booked after it. Never raises."""
        if slot.grant is None:
            return
        self.abandoned += 1
        if await self._give_back(slot.grant):
            self.abandoned_returned += 1

    async def on_throttled(self) -> None:
        """The service answered Throttling: tell the shared rate (best effort, never raises). A lone
        throttle lowers it a little for about a second; repeated ones move it towards the service's
        real limit (``reaction``); throttles of calls booked before a change count once."""
        if self.rate.unlimited:
            return
        try:
            factor, kind = await self.backend.gcra_throttled(self.key, self.adapt_key, self.rate)
        except CarnumberError as exc:
            log.warning("rate limit %s: throttle not recorded (%s)", self.key, exc)
            return
        qps = self.rate.qps * factor / PPM
        if kind == HELD:
            log.debug("rate limit %s: throttled again in the same moment (%.2f qps)", self.key, qps)
        elif kind == LONE:
            log.info("rate limit %s: a lone throttle: %.2f qps for about a second", self.key, qps)
        else:
            # Once in a while loud: probing against a lower real limit meets it every half minute.
            now = time.monotonic()
            loud = now - self._warned_at >= WARN_EVERY_S
            self._warned_at = now if loud else self._warned_at
            log.log(
                logging.WARNING if loud else logging.INFO,
                "rate limit %s: throttles repeat (the account's real limit looks lower than %g qps): "
                "now %.2f qps, probing upwards slowly",
                self.key,
                self.rate.qps,
                qps,
            )

    async def on_success(self) -> None:
        """A call succeeded. Free: recovery is computed from the time since the last throttle
        whenever a slot is reserved, so there is nothing to record here."""

    async def state(self) -> RateState:
        """The factor in force and how far ahead slots are booked (for status and tests)."""
        return await self.backend.gcra_peek(self.key, self.adapt_key, self.rate)

    async def effective_qps(self) -> float:
        """The rate in force now, calls per second (``qps`` lowered by recent throttles; the
        pacing itself is ``guard_s`` per second slower than this)."""
        if self.rate.unlimited:
            return 0.0
        return self.rate.qps * (await self.state()).factor_ppm / PPM

    # -- internals ----------------------------------------------------------------------------
    def _local_queue(self) -> asyncio.Lock:
        """This loop's FIFO of waiters (asyncio.Lock hands over in arrival order)."""
        loop = asyncio.get_running_loop()
        if self._gate is None or self._gate[0] is not loop:
            self._gate = (loop, asyncio.Lock())
        return self._gate[1]

    async def _reserve(self) -> Grant:
        # Shielded: if we are cancelled while the step is in flight, the step still completes
        # and its slot is given back instead of being booked for nobody.
        step = asyncio.ensure_future(self.backend.gcra_reserve(self.key, self.adapt_key, self.rate))
        try:
            return await asyncio.shield(step)
        except asyncio.CancelledError:
            step.add_done_callback(self._orphaned)
            raise

    def _orphaned(self, step: asyncio.Future[Grant]) -> None:
        if step.cancelled() or step.exception() is not None:
            return
        self._in_background(self._give_back(step.result()))

    async def _give_back(self, grant: Grant) -> bool:
        """Return an unused slot; ``True`` when it was (never raises: a slot that cannot be
        returned is lost, which is slower, never faster)."""
        try:
            return await self.backend.gcra_give_back(self.key, grant)
        except CarnumberError as exc:
            log.debug("rate limit %s: slot not given back (%s)", self.key, exc)
            return False

    async def _return_late(self, grant: Grant) -> bool:
        """Give back a slot its waiter woke too late for, before booking a new one (awaited, so
        the new reservation sees it); ``True`` when it was returned."""
        returned = await self._give_back(grant)
        if returned:
            self.late_returned += 1
        return returned

    def _in_background(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
