"""The one place where a call is admitted onto the wire.

``ticket = await gate.admit()`` runs immediately before every HTTP request, retries included:
fleet stop flag → circuit breaker → the run's pause flag → global rate-limit token → quota
reservation. Any of them may
raise :class:`Paused`, which leaves the image pending (never failed). The request must start by
``ticket.send_by``; one that cannot is not sent, and ``await gate.abandon(ticket)`` returns its
token (when nobody booked after it) and its quota reservation, to the quota window it was
counted in (one admitted before midnight frees a call of that day, not of the new one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["Admission", "Gate", "Limiter", "Quota", "RunSwitch", "Switch", "Ticket"]


class Switch(Protocol):
    async def check(self) -> None: ...


class Admission(Protocol):
    @property
    def send_by(self) -> float: ...


class Limiter(Protocol):
    async def acquire(self) -> Admission: ...
    async def abandon(self, slot: Admission) -> None: ...
    async def on_throttled(self) -> None: ...


class RunSwitch(Protocol):
    async def check(self, run_id: str) -> None: ...


class Quota(Protocol):
    async def reserve(self) -> str | None: ...
    async def release(self, reserved: str | None) -> None: ...


@dataclass(frozen=True, slots=True)
class Ticket:
    """One admitted call: the limiter's ``slot`` and the quota window it was counted in
    (``None``: no quota), both needed to hand it back."""

    slot: Admission
    quota_key: str | None

    @property
    def send_by(self) -> float:
        return self.slot.send_by


@dataclass(slots=True)
class Gate:
    fleet: Switch
    breaker: Switch
    limiter: Limiter
    quota: Quota
    runs: RunSwitch | None = None  # per-run pause and cancel (``workers/books/control.py``)

    async def admit(self, run_id: str = "") -> Ticket:
        """Wait for a token; raise ``FleetStopped``/``CircuitOpen``/``QuotaExhausted``, or
        ``RunPaused`` for a paused or cancelled ``run_id``, instead."""
        await self.fleet.check()
        await self.breaker.check()
        if self.runs is not None and run_id:
            await self.runs.check(run_id)
        slot = await self.limiter.acquire()
        # The token wait can be long: a stop or pause raised meanwhile must not let this call through.
        await self.fleet.check()
        if self.runs is not None and run_id:
            await self.runs.check(run_id)
        return Ticket(slot, await self.quota.reserve())

    async def abandon(self, ticket: Ticket) -> None:
        """The request admitted with ``ticket`` (what :meth:`admit` returned) was not sent:
        return its token and its quota reservation."""
        await self.limiter.abandon(ticket.slot)
        await self.quota.release(ticket.quota_key)
