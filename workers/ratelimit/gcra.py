"""GCRA with an adaptive rate factor: the algorithm only, over plain numbers (no storage, no I/O).

GCRA (the generic cell rate algorithm) keeps one number per limit, the *theoretical arrival time*
``tat`` of the next call. A caller arriving at ``now`` is given the slot
``max(now, tat - tolerance)`` and moves ``tat`` to ``max(tat, now) + increment``. With
``increment >= interval = 1/qps`` and ``tolerance = (burst - 1) * interval`` no window of length
``t`` ever holds more than ``qps * t + burst`` slots. Callers *reserve* a slot and sleep until it,
so every admission costs exactly one backend round trip and callers are served in arrival order.

The adaptive factor ``f`` (``floor <= f <= 1``) stretches the increment to ``interval / f`` after
the service answered ``Throttling`` anyway: a throttle multiplies ``f`` by ``decrease``, and ``f``
climbs back linearly, ``1 / recovery_s`` per second, computed from the time of the last throttle
whenever a slot is reserved (so successes cost nothing). After a decrease, further throttles are
ignored until ``hold_s`` has passed *and* every slot booked before the decrease has gone by: calls
sent on those slots were scheduled at the old rate, so their throttles say nothing new.

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
from dataclasses import dataclass

from workers.errors import ConfigError

__all__ = ["PPM", "Adapt", "Grant", "Rate", "current_factor", "give_back", "reserve", "throttle"]

PPM = 1_000_000  # a factor of 1.0, in parts per million


@dataclass(frozen=True, slots=True)
class Rate:
    """A validated rate limit: ``qps`` calls per second (0 = unlimited), ``burst`` back to back.

    ``decrease``: factor applied on a throttle (0 < d < 1); ``floor``: lowest factor (0 < f <= 1);
    ``recovery_s``: seconds for the factor to climb by 1.0; ``hold_s``: throttles within this many
    seconds of the last decrease (or before the slots booked then have passed) count as the same
    event; ``guard_s``: seconds added to every second of pacing (0 <= g < 1), so ``qps`` calls
    are spread over ``1 + guard_s`` s and each may arrive up to ``guard_s`` late without making
    ``qps + 1`` in any 1-s window. Raises :class:`ConfigError`.
    """

    qps: float
    burst: int = 1
    decrease: float = 0.5
    floor: float = 0.1
    recovery_s: float = 60.0
    hold_s: float = 1.0
    guard_s: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.qps) and self.qps >= 0):
            raise ConfigError(f"qps must be a finite number >= 0 (0 = unlimited), got {self.qps}")
        if not isinstance(self.burst, int) or self.burst < 1:
            raise ConfigError(f"burst must be an integer >= 1, got {self.burst!r}")
        if not 0 < self.decrease < 1:
            raise ConfigError(f"decrease must be between 0 and 1, got {self.decrease}")
        if not 0 < self.floor <= 1:
            raise ConfigError(f"floor must be > 0 and <= 1, got {self.floor}")
        if not (math.isfinite(self.recovery_s) and self.recovery_s > 0):
            raise ConfigError(f"recovery_s must be > 0, got {self.recovery_s}")
        if not (math.isfinite(self.hold_s) and self.hold_s >= 0):
            raise ConfigError(f"hold_s must be >= 0, got {self.hold_s}")
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


@dataclass(frozen=True, slots=True)
class Adapt:
    """The adaptive state after the last decrease: the factor set then (ppm), when (``at_us``, the
    base of the recovery), and until when later throttles are ignored (``hold_until_us``)."""

    factor_ppm: int
    at_us: int
    hold_until_us: int


def current_factor(adapt: Adapt | None, now_us: int, rate: Rate) -> float:
    """The factor in ppm now (PPM when no throttle is remembered)."""
    if adapt is None:
        return float(PPM)
    climbed = (now_us - adapt.at_us) * PPM / (rate.recovery_s * PPM)
    return min(float(PPM), adapt.factor_ppm + climbed)


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


def throttle(adapt: Adapt | None, tat_us: int | None, now_us: int, rate: Rate) -> Adapt | None:
    """The adaptive state after a throttling answer, or ``None`` while the last decrease holds.
    ``tat_us`` is the limit's state now: slots up to it were booked at the old rate."""
    if adapt is not None and now_us < adapt.hold_until_us:
        return None
    lowered = max(rate.floor * PPM, current_factor(adapt, now_us, rate) * rate.decrease)
    hold_until = max(now_us + math.ceil(rate.hold_s * PPM), tat_us or 0)
    return Adapt(math.floor(lowered), now_us, hold_until)
