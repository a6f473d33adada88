"""The one place where a call is admitted onto the wire.

``slot = await gate.admit()`` runs immediately before every HTTP request, retries included:
fleet stop flag → circuit breaker → the run's pause flag → global rate-limit token → quota
reservation. Any of them may
raise :class:`Paused`, which leaves the image pending (never failed). The request must start by
``slot.send_by``; one that cannot is not sent, and ``await gate.abandon(slot)`` returns its
token (when nobody booked after it) and its quota reservation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["Admission", "Gate", "Limiter", "Quota", "RunSwitch", "Switch"]


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
    async def reserve(self) -> None: ...
    async def release(self) -> None: ...


@dataclass(slots=True)
class Gate:
    fleet: Switch
    breaker: Switch
    limiter: Limiter
    quota: Quota
    runs: RunSwitch | None = None  # per-run pause and cancel (``workers/books/control.py``)

    async def admit(self, run_id: str = "") -> Admission:
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
        await self.quota.reserve()
        return slot

    async def abandon(self, slot: Admission) -> None:
        """The request admitted on ``slot`` was not sent: return its token and its quota."""
        await self.limiter.abandon(slot)
        await self.quota.release()
