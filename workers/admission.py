"""The one place where a call is admitted onto the wire.

``slot = await gate.admit()`` runs immediately before every HTTP request, retries included:
fleet stop flag → circuit breaker → global rate-limit token → quota reservation. Any of them may
raise :class:`Paused`, which leaves the image pending (never failed). The request must start by
``slot.send_by``; one that cannot is not sent, and ``await gate.abandon(slot)`` returns its
token (when nobody booked after it) and its quota reservation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["Admission", "Gate", "Limiter", "Quota", "Switch"]


class Switch(Protocol):
    async def check(self) -> None: ...


class Admission(Protocol):
    @property
    def send_by(self) -> float: ...


class Limiter(Protocol):
    async def acquire(self) -> Admission: ...
    async def abandon(self, slot: Admission) -> None: ...
    async def on_throttled(self) -> None: ...


class Quota(Protocol):
    async def reserve(self) -> None: ...
    async def release(self) -> None: ...


@dataclass(slots=True)
class Gate:
    fleet: Switch
    breaker: Switch
    limiter: Limiter
    quota: Quota

    async def admit(self) -> Admission:
        """Wait for a token; raise ``FleetStopped``/``CircuitOpen``/``QuotaExhausted`` instead."""
        await self.fleet.check()
        await self.breaker.check()
        slot = await self.limiter.acquire()
        # The token wait can be long: a stop raised meanwhile must not let this call through.
        await self.fleet.check()
        await self.quota.reserve()
        return slot

    async def abandon(self, slot: Admission) -> None:
        """The request admitted on ``slot`` was not sent: return its token and its quota."""
        await self.limiter.abandon(slot)
        await self.quota.release()
