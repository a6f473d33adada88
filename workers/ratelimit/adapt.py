"""How the shared rate answers ``Throttling``: in proportion. Pure functions over plain numbers.

A throttle says that one call was one too many in the service's window. Two causes call for
opposite reactions:

* **A lone throttle** (the gateway's own timing, a call that reached it late, a call refused at
  random): the rate was right. The factor dips by ``lone_decrease`` and climbs back at the fast
  pace (``climb_s``) to where it was: at the defaults 5 % less for about a second, 0.025 s of the
  limit in all (1.25 calls at 50 qps), then on at the limit.
* **Repeated throttles** say the service's real limit is below ours (another system shares the
  account). They are repeated when they are more than ``repeated_share`` of the calls of the
  last ``memory_s`` (an exponentially decayed count; and at least two), or two or more are
  :data:`FAR_SHARE` of the calls at the new rate, or any throttle comes while the fleet is
  already probing below the limit for a real limit it found before. Multiplicative decrease:
  the share of calls throttled at the new rate puts the real limit that far below the throttled
  level, and the knee ``knee`` below that estimate; the factor is cut by ``decrease``, or to
  the knee when that is lower (far above it, one cut instead of many); a fast climb back to the
  knee; then a slow probe upwards that starts at almost nothing and grows with the square of the
  time (``probe_s``), so the fleet spends its time just below the real limit, asks for more only
  slowly, and finds its way back up when the other system has gone. A throttle that comes while
  still climbing fast says the knee was too high: that cut starts the probe at once.

After any change, further throttles only count until every slot booked before the change has
gone by *and* ``hold_s`` after that (the first whole second the service counts at the new
rate): calls sent on those were scheduled at the old rate and say nothing new. Throttles after
the old slots count towards the share at the new rate. The factor is computed from the state
whenever a slot is reserved, so successes cost nothing. ``adapt.lua`` is this module's
line-by-line twin for Redis (put in front of the ``gcra_*`` scripts). Times are integer
microseconds of the backend's clock; factors are parts per million. See
``ops/design/rate-limit.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from workers.errors import ConfigError

__all__ = [
    "FAR_SHARE",
    "HELD",
    "LONE",
    "PPM",
    "REPEATED",
    "SAMPLE_CALLS",
    "Adapt",
    "Reaction",
    "expires_after_us",
    "factor_at",
    "on_throttle",
]

PPM = 1_000_000  # a factor of 1.0, in parts per million

# What a throttle did (the backends report it, the limiter logs it).
HELD, LONE, REPEATED = 0, 1, 2
# Fewer calls than this since the last change say too little to place the real limit by the
# share throttled (one throttle in 3 calls is not a limit a third lower).
SAMPLE_CALLS = 8
# This share of the calls since the last change throttled (two throttles at least) says the rate
# is far above the real limit, without waiting for the decayed count to show it.
FAR_SHARE = 0.05


@dataclass(frozen=True, slots=True)
class Reaction:
    """The reaction policy's figures; seconds and fractions of the configured rate.

    ``lone_decrease``: factor applied on a lone throttle (0 < d <= 1); ``climb_s``: seconds for the
    factor to climb by 1.0 at the fast pace (20: 5 % of the rate per second); ``decrease``: factor
    applied to the throttled level on repeated throttles, at least (0 < d < 1); ``knee``: the
    fraction of that level the fast climb goes back to (decrease <= knee <= 1); ``probe_s``: the
    probe above the knee gains ``(t / probe_s)²`` of the knee in ``t`` seconds (180: +2 % after
    25 s, +10 % after 57 s); ``floor``: lowest factor; ``hold_s``: throttles this soon after a
    change count as the same event; ``memory_s``: how long a throttle counts towards telling a
    lone one from repeated ones (exponential decay); ``repeated_share``: the share of recent calls
    throttled that makes throttles repeated. Raises :class:`ConfigError`.
    """

    lone_decrease: float = 0.95
    climb_s: float = 20.0
    decrease: float = 0.9
    knee: float = 0.98
    probe_s: float = 180.0
    floor: float = 0.1
    hold_s: float = 1.0
    memory_s: float = 30.0
    repeated_share: float = 0.01

    def __post_init__(self) -> None:
        checks = (
            ("lone_decrease", 0 < self.lone_decrease <= 1, "between 0 (excluded) and 1"),
            ("decrease", 0 < self.decrease < 1, "between 0 and 1"),
            ("knee", self.decrease <= self.knee <= 1, "between decrease and 1"),
            ("floor", 0 < self.floor <= 1, "> 0 and <= 1"),
            ("hold_s", self.hold_s >= 0, ">= 0"),
            ("repeated_share", 0 < self.repeated_share <= 1, "> 0 and <= 1"),
            *((name, getattr(self, name) > 0, "> 0") for name in ("climb_s", "probe_s", "memory_s")),
        )
        for name, ok, rule in checks:
            value = getattr(self, name)
            if not (math.isfinite(value) and ok):
                raise ConfigError(f"rate reaction: {name} must be {rule}, got {value}")

    @property
    def args(self) -> list[str]:
        """The figures in the order ``adapt.lua`` takes them (``ARGV``)."""
        return [
            repr(float(v))
            for v in (
                self.lone_decrease, self.climb_s, self.decrease, self.knee, self.probe_s,
                self.floor, self.hold_s, self.memory_s, self.repeated_share,
            )
        ]


@dataclass(frozen=True, slots=True)
class Adapt:
    """The adaptive state. The factor was set to ``factor_ppm`` at ``at_us`` and climbs at the
    fast pace up to ``knee_ppm``, then at the probing pace up to 1.0. Throttles before
    ``hold_until_us`` only add to ``score`` (throttles seen, decayed with ``memory_s``, as of
    ``score_at_us``) and, after the slots booked at the old rate, to ``since`` (throttles at the
    new rate; the hold ends ``hold_s`` after those slots)."""

    factor_ppm: int
    at_us: int
    knee_ppm: int
    hold_until_us: int
    score: float
    score_at_us: int
    since: int = 0


def factor_at(adapt: Adapt | None, now_us: int, r: Reaction) -> float:
    """The factor in force at ``now_us``, ppm (PPM when no throttle is remembered)."""
    if adapt is None:
        return float(PPM)
    f0, dt_s = float(adapt.factor_ppm), max(0, now_us - adapt.at_us) / PPM
    if f0 < adapt.knee_ppm:
        fast_s = (adapt.knee_ppm - f0) * r.climb_s / PPM  # seconds to reach the knee
        if dt_s <= fast_s:
            return f0 + dt_s * PPM / r.climb_s
        f0, dt_s = float(adapt.knee_ppm), dt_s - fast_s
    # Probing above the knee: slowly at first, faster the longer no throttle comes (the factor
    # grows with the square of the time, relative to the knee, so a cycle takes as long at any
    # real limit): +2 % of the knee after 0.14 probe_s, +25 % after half of it.
    return min(float(PPM), f0 + adapt.knee_ppm * (dt_s / r.probe_s) ** 2)


def _score(adapt: Adapt | None, now_us: int, r: Reaction) -> float:
    if adapt is None:
        return 0.0
    return adapt.score * math.exp(-max(0, now_us - adapt.score_at_us) / (r.memory_s * PPM))


def on_throttle(
    adapt: Adapt | None, tat_us: int | None, now_us: int, calls_per_s: float, r: Reaction
) -> tuple[Adapt, int]:
    """The state after a throttling answer at ``now_us`` and what it did (:data:`HELD`,
    :data:`LONE` or :data:`REPEATED`). ``tat_us``: the limit's state (slots up to it were booked
    at the old rate); ``calls_per_s``: the pacing at factor 1.0, for the share of calls throttled."""
    score = _score(adapt, now_us, r) + 1
    hold_us = math.ceil(r.hold_s * PPM)
    if adapt is not None and now_us < adapt.hold_until_us:
        # Counted towards the share only once the slots booked at the old rate have gone by.
        settled = now_us >= adapt.hold_until_us - hold_us
        return replace(adapt, score=score, score_at_us=now_us, since=adapt.since + settled), HELD
    level = factor_at(adapt, now_us, r)
    recent_calls = r.memory_s * calls_per_s * level / PPM
    # The share of calls throttled since the new rate took hold, when enough calls say (this
    # throttle, which ends the count, left out: counting up to a throttle over-counts).
    calls = 0.0
    if adapt is not None:
        calls = (now_us - max(adapt.at_us, adapt.hold_until_us - hold_us)) / PPM * calls_per_s * level / PPM
    share = adapt.since / calls if adapt is not None and calls >= SAMPLE_CALLS else 0.0
    # Below the limit with a knee under it, the fleet is probing for a real limit it has found:
    # any throttle there says where that limit is.
    probing = adapt is not None and adapt.knee_ppm < PPM and level < PPM
    recent = score >= r.repeated_share * recent_calls or (adapt is not None and adapt.since >= 1
                                                          and share >= FAR_SHARE)
    if adapt is not None and (probing or (score >= 1.5 and recent)):
        # The share says how far above the real limit this level is: the knee is that far
        # below it, and by its own margin; the cut goes at least there (one cut, not many).
        knee = level * max(0.0, 1 - share) * r.knee
        lowered = max(r.floor * PPM, min(level * r.decrease, knee))
        if level < adapt.knee_ppm:  # throttled on the way back: that knee was too high
            knee = lowered
        knee = max(lowered, knee)
        kind = REPEATED
    else:
        # Back to where it was, or was climbing to: a lone throttle never lowers the knee.
        lowered = max(r.floor * PPM, level * r.lone_decrease)
        knee, kind = max(level, adapt.knee_ppm if adapt is not None else 0), LONE
    # The change holds for hold_s after the slots booked at the old rate have gone by: the
    # first whole second the service counts at the new rate.
    hold_until = max(now_us, tat_us or 0) + hold_us
    return Adapt(math.floor(lowered), now_us, math.floor(knee), hold_until, score, now_us), kind


def expires_after_us(adapt: Adapt, now_us: int, r: Reaction) -> int:
    """How long the state still matters: until fully recovered, no longer holding, and its score
    decayed below 1 % (microseconds)."""
    fast_us = max(0.0, adapt.knee_ppm - adapt.factor_ppm) * r.climb_s
    slow_us = math.sqrt(max(0.0, PPM / max(1, adapt.knee_ppm) - 1)) * r.probe_s * PPM
    decay_us = math.log(max(1.0, adapt.score) * 100) * r.memory_s * PPM
    return math.ceil(max(fast_us + slow_us, adapt.hold_until_us - now_us, decay_us))
