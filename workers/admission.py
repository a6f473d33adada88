"""The one place where a call is admitted onto the wire.

``await gate.admit()`` runs immediately before every HTTP request, retries included:
fleet stop flag → circuit breaker → global rate-limit token → quota reservation. Any of them may
raise :class:`Paused`, which leaves the image pending (never failed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["Gate", "Limiter", "Quota", "Switch"]


class Switch(Protocol):
    async def check(self) -> None: ...


class Limiter(Protocol):
    async def acquire(self) -> None: ...
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

    async def admit(self) -> None:
        """Wait for a token; raise ``FleetStopped``/``CircuitOpen``/``QuotaExhausted`` instead."""
        await self.fleet.check()
        await self.breaker.check()
        await self.limiter.acquire()
        # The token wait can be long: a stop raised meanwhile must not let this call through.
        await self.fleet.check()
        await self.quota.reserve()
