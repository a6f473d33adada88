"""GCRA with an adaptive rate factor: the algorithm only, over plain numbers (no storage, no I/O).

GCRA (the generic cell rate algorithm) keeps one number per limit, the *theoretical arrival time*
``tat`` of the next call. A caller arriving at ``now`` is given the slot
``max(now, tat - tolerance)`` and moves ``tat`` to ``max(tat, now) + increment``. With
``increment >= interval = 1/qps`` and ``tolerance = (burst - 1) * interval`` no window of length
``t`` ever holds more than ``qps * t + burst`` slots. Callers *reserve* a slot and sleep until it,
so every admission costs exactly one backend round trip and callers are served in arrival order.

The adaptive factor ``f`` (``floor <= f <= 1``, :mod:`workers.ratelimit.adapt`) stretches the
increment to ``interval / f`` after the service answered ``Throttling`` anyway; this module only
applies it.

A *guard* (``guard_s``) paces ``qps`` calls per ``1 + guard_s`` seconds instead of per second:
a call may then reach the service up to ``guard_s`` after its slot without putting ``qps + 1``
calls into any one-second window the service counts (at the cost of ``guard / (1 + guard)`` of
the rate). The algorithm's default is no guard; the product sets one (``CARNUMBER_RATE_GUARD_MS``).

Times are integer microseconds of the *backend's* clock (Redis ``TIME``); factors are parts per
million. ``gcra_*.lua`` next to this module are line-by-line twins of these functions (the guard
is folded into ``interval_us``, which the scripts take as an argument).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from workers.errors import ConfigError
from workers.ratelimit.adapt import PPM, Reaction

__all__ = ["PPM", "Grant", "Rate", "give_back", "reserve"]


@dataclass(frozen=True, slots=True)
class Rate:
    """A validated rate limit: ``qps`` calls per second (0 = unlimited), ``burst`` back to back.

    ``guard_s``: seconds added to every second of pacing (0 <= g < 1), so ``qps`` calls are spread
    over ``1 + guard_s`` s and each may arrive up to ``guard_s`` late without making ``qps + 1`` in
    any 1-s window; ``reaction``: how the rate answers throttles (:class:`~workers.ratelimit.adapt.
    Reaction`). Raises :class:`ConfigError`.
    """

    qps: float
    burst: int = 1
    guard_s: float = 0.0
    reaction: Reaction = field(default_factory=Reaction)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.qps) and self.qps >= 0):
            raise ConfigError(f"qps must be a finite number >= 0 (0 = unlimited), got {self.qps}")
        if not isinstance(self.burst, int) or self.burst < 1:
            raise ConfigError(f"burst must be an integer >= 1, got {self.burst!r}")
        if not (math.isfinite(self.guard_s) and 0 <= self.guard_s < 1):
            raise ConfigError(f"guard_s must be >= 0 and < 1 (seconds), got {self.guard_s}")

    @property
    def unlimited(self) -> bool:
        return self.qps == 0

    @property
    def interval_us(self) -> int:
        """Spacing of calls at the configured rate, microseconds: ``(1 s + guard) / qps``,
        rounded up (never faster)."""
        return max(1, math.ceil((PPM + round(self.guard_s * PPM)) / self.qps))

    @property
    def calls_per_s(self) -> float:
        """Calls per second at the pacing, guard included (``qps / (1 + guard_s)``)."""
        return PPM / self.interval_us


@dataclass(frozen=True, slots=True)
class Grant:
    """One reserved slot. ``slot_us - now_us`` is how long the caller sleeps before sending;
    ``tat_us`` and ``increment_us`` identify the reservation so an unused one can be given back."""

    slot_us: int
    now_us: int
    tat_us: int
    increment_us: int
    factor_ppm: int

    @property
    def wait_s(self) -> float:
        return max(0, self.slot_us - self.now_us) / PPM


def reserve(tat_us: int | None, now_us: int, rate: Rate, factor_ppm: float) -> Grant:
    """Reserve the next slot; the new state is ``grant.tat_us``."""
    interval = rate.interval_us
    increment = math.ceil(interval * PPM / factor_ppm)
    tolerance = (rate.burst - 1) * interval  # of the configured rate: a slower rate never widens it
    tat = now_us if tat_us is None or tat_us < now_us else tat_us
    slot = max(now_us, tat - tolerance)
    return Grant(slot, now_us, tat + increment, increment, math.floor(factor_ppm))


def give_back(tat_us: int | None, grant: Grant) -> int | None:
    """The state after returning an unused ``grant``, or ``None`` when a later reservation was made
    since (the slot is then simply lost, which only ever slows the fleet down)."""
    if tat_us is None or tat_us != grant.tat_us:
        return None
    return tat_us - grant.increment_us
