"""How the shared rate answers throttles (``workers/ratelimit/adapt.py``): the policy as pure
functions; the policy played against the stand-in's own whole-second limiter on the memory
backend's injected clock (minutes of traffic in milliseconds); and the same steps through both
backends, so the Lua twin (``adapt.lua``) does what the Python does."""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass, replace

import pytest
from test_ratelimit_support import BackendRunner, run_backend

from ocrserver.ratelimit import SecondWindowLimiter
from workers.errors import ConfigError
from workers.ratelimit import Backend, MemoryBackend, Rate, RateLimiter, RedisBackend
from workers.ratelimit.adapt import HELD, LONE, PPM, REPEATED, Adapt, Reaction, factor_at, on_throttle

__all__ = ["run_backend"]

S = PPM  # one second in microseconds
R = Reaction()


def _cost_s(adapt: Adapt, r: Reaction, until_s: float) -> float:
    """Seconds of the full rate lost below factor 1.0 from ``adapt.at_us`` on (numerically)."""
    steps = 10_000
    dt = until_s / steps
    return sum((PPM - factor_at(adapt, adapt.at_us + round(i * dt * S), r)) / PPM * dt for i in range(steps))


def test_reaction_validates_its_figures() -> None:
    for bad in (
        {"lone_decrease": 0.0}, {"lone_decrease": 1.1}, {"decrease": 1.0}, {"knee": 0.5},
        {"knee": 1.01}, {"floor": 0.0}, {"hold_s": -1.0}, {"climb_s": 0.0}, {"probe_s": math.inf},
        {"memory_s": 0.0}, {"repeated_share": 0.0},
    ):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            Reaction(**bad)  # type: ignore[arg-type]
    assert len(R.args) == 9


def test_a_lone_throttle_holds_about_a_second_then_goes_on_at_the_limit() -> None:
    state, kind = on_throttle(None, 10 * S, 10 * S, 50.0, R)
    assert kind == LONE and state.factor_ppm == 950_000 and state.knee_ppm == PPM
    assert factor_at(state, 10 * S + S // 2, R) == pytest.approx(975_000)
    assert factor_at(state, 11 * S, R) == PPM  # back at the limit after one second
    assert _cost_s(state, R, 5.0) == pytest.approx(0.025, rel=0.01)  # 1.25 calls at 50 qps


def test_throttles_in_the_same_moment_only_add_to_the_score() -> None:
    """Calls booked at the old rate, and ``hold_s`` after them: the same event. Only throttles of
    calls sent at the new rate count towards the share that places the real limit."""
    state, _ = on_throttle(None, 12 * S, 10 * S, 10.0, R)  # slots booked up to 12 s
    assert state.hold_until_us == 13 * S
    held, kind = on_throttle(state, 12 * S, 11 * S, 10.0, R)
    assert kind == HELD and (held.factor_ppm, held.at_us, held.knee_ppm) == (950_000, 10 * S, PPM)
    assert held.score == pytest.approx(1 + math.exp(-1 / 30)) and held.since == 0  # old rate
    held, kind = on_throttle(held, 12 * S, 12 * S + S // 2, 10.0, R)
    assert kind == HELD and held.since == 1  # the new rate
    late, kind = on_throttle(held, 12 * S, 13 * S, 10.0, R)
    assert kind != HELD and late.at_us == 13 * S


def test_repeated_throttles_cut_from_the_level_then_climb_fast_to_the_knee_and_probe() -> None:
    """More than 1 % of recent calls throttled: the real limit is lower. A cut to 0.9 of the
    throttled level, a fast climb back to 0.98 of it, then a probe that starts slowly."""
    # Back at the limit after a lone throttle, with three throttles in the last few seconds:
    first = Adapt(950_000, 0, PPM, S, 3.0, 0)
    assert on_throttle(first, 0, 10 * S, 50.0, R)[1] == LONE  # 3 of 1,500 calls: still lone
    second, kind = on_throttle(first, 0, 10 * S, 10.0, R)  # 3 of 300: repeated
    assert kind == REPEATED
    knee = 980_000
    assert second.factor_ppm == 900_000 and second.knee_ppm == knee
    at = second.at_us
    assert factor_at(second, at + S, R) == pytest.approx(950_000)  # 5 % per second up to...
    assert factor_at(second, at + round(1.6 * S), R) == pytest.approx(knee)  # ...the knee,
    # then (t / 180 s)² of the knee: +0.03 % after 3 s, +2 % after 25 s, all of it after 37 s.
    assert factor_at(second, at + round(4.6 * S), R) == pytest.approx(knee * (1 + (3 / 180) ** 2))
    assert factor_at(second, at + round(26.6 * S), R) == pytest.approx(knee * 1.02, rel=1e-3)
    assert factor_at(second, at + 40 * S, R) == PPM
    # Any throttle while probing below the limit says where the real limit is: the knee goes
    # 2 % below that level.
    third, kind = on_throttle(second, 0, at + round(26.6 * S), 10.0, R)
    assert kind == REPEATED and third.knee_ppm == pytest.approx(knee * 1.02 * 0.98, rel=1e-3)


def test_a_large_share_throttled_places_the_real_limit_in_one_cut() -> None:
    """Far above the real limit, the share of calls throttled since the last change says where it
    is: half the calls of the last second throttled, the rate is halved at once (and the knee's
    2 % below that)."""
    first, _ = on_throttle(None, 0, 0, 10.0, R)
    state = first
    for i in range(5):  # 5 of the 10 calls in the second after the first throttle
        state, kind = on_throttle(state, 0, (i + 1) * S // 10, 10.0, R)
        assert kind == HELD
    cut, kind = on_throttle(state, 0, S, 10.0, R)  # the one that ends the count is left out
    level = factor_at(state, S, R)
    calls = 10.0 * level / PPM
    assert kind == REPEATED
    assert cut.factor_ppm == cut.knee_ppm == math.floor(level * (1 - 5 / calls) * 0.98) == 490_000
    # With too few calls since the last change to tell, only the usual cut.
    few, _ = on_throttle(replace(state, hold_until_us=0), 0, S // 2 + S // 10, 10.0, R)
    assert few.factor_ppm == math.floor(factor_at(state, S // 2 + S // 10, R) * 0.9)


def test_a_throttle_while_still_climbing_fast_starts_the_slow_probe_at_once() -> None:
    """Throttled on the way back to the knee: the knee was too high, so no fast climb this time."""
    state = Adapt(900_000, 0, 980_000, 0, 5.0, 0)
    level = factor_at(state, S, R)
    assert level == pytest.approx(950_000)
    cut, kind = on_throttle(state, 0, S, 50.0, R)  # one throttle in 47 calls: the usual cut
    assert kind == REPEATED and cut.factor_ppm == cut.knee_ppm == math.floor(level * 0.9)


def test_a_lone_throttle_never_lowers_the_knee() -> None:
    """Two lone throttles close together (a gateway refusing the odd call): the second, while the
    first is still climbing back, climbs back to the limit too, not to where it struck."""
    first, _ = on_throttle(None, 0, 0, 50.0, R)
    second, kind = on_throttle(first, 0, S // 2 + S, 50.0, R)  # 1.5 s later, after the hold
    assert kind == LONE and second.knee_ppm == PPM
    assert factor_at(second, 10 * S, R) == PPM


def test_a_few_throttles_among_many_calls_stay_lone() -> None:
    """At 50 qps, 1 % of the last 30 s is 15 calls: five throttles there are still lone ones."""
    state: Adapt | None = None
    kinds = []
    for i in range(5):
        state, kind = on_throttle(state, 0, (2 * i) * S, 50.0, R)
        kinds.append(kind)
    assert kinds == [LONE] * 5


# -- the policy against the stand-in's whole-second limit, on the memory backend's clock -------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Played:
    accepted: list[float]
    throttled: list[float]
    qps: int
    guard_s: float

    def rate(self, start_s: float, end_s: float) -> float:
        return sum(1 for t in self.accepted if start_s <= t < end_s) / (end_s - start_s)

    def throttled_share(self, start_s: float = 0.0) -> float:
        n = sum(1 for t in self.throttled if t >= start_s)
        return n / max(1, n + sum(1 for t in self.accepted if t >= start_s))

    def lost_calls(self, seconds: float) -> float:
        """Calls the pacing allowed (guard included) that were not sent."""
        return self.qps / (1 + self.guard_s) * seconds - len(self.accepted) - len(self.throttled)


def _play(qps: int, real_limit: int, seconds: float, random_share: float = 0.0, seed: int = 1) -> Played:
    """A fleet that always has work (it books the next slot when the last one is due) sends each
    call up to 3 ms after its slot to a service that counts whole seconds (the stand-in's own
    limiter) up to ``real_limit`` and throttles ``random_share`` of what it let in at random."""
    rng = random.Random(seed)
    clock = FakeClock()
    backend = MemoryBackend(clock=clock)
    rate = Rate(qps, guard_s=0.01)
    service = SecondWindowLimiter(real_limit)
    played = Played([], [], qps, rate.guard_s)

    async def run() -> None:
        while clock.now < seconds:
            grant = await backend.gcra_reserve("k", "k:adapt", rate)
            arrived = grant.slot_us / PPM + rng.uniform(0, 0.003)
            clock.now = arrived
            if service.try_acquire("account", arrived) and rng.random() >= random_share:
                played.accepted.append(arrived)
                clock.now = grant.slot_us / PPM  # the next caller books as this slot comes due
            else:
                played.throttled.append(arrived)
                await backend.gcra_throttled("k", "k:adapt", rate)

    asyncio.run(run())
    return played


def test_throttles_at_random_cost_about_a_call_each() -> None:
    """Case (c) of the benchmark: Q = 50, one call in 500 throttled at random though within the
    limit. Each lone throttle costs about 1.25 calls, so the fleet holds 98 % of Q."""
    for seed in range(3):
        played = _play(50, 50, 300.0, random_share=0.002, seed=seed)
        assert 15 <= len(played.throttled) <= 50
        assert played.rate(10, 300) >= 0.98 * 50
        assert played.lost_calls(300) <= 2.0 * len(played.throttled)


@pytest.mark.parametrize(("qps", "real_limit"), [(10, 8), (10, 5), (50, 45)])
def test_repeated_throttles_converge_on_a_lower_real_limit(qps: int, real_limit: int) -> None:
    """Case (d): ``CARNUMBER_QPS`` above the service's real limit. After 30 s the fleet holds at
    least 95 % of the real limit with at most 1 % of its calls throttled."""
    played = _play(qps, real_limit, 150.0)
    assert played.rate(30, 150) >= 0.95 * real_limit
    assert played.throttled_share(30) <= 0.01
    assert played.throttled_share() <= 0.05  # convergence included


def test_no_throttle_no_reaction() -> None:
    played = _play(10, 10, 60.0)
    assert played.throttled == [] and played.lost_calls(60) <= 1


# -- the same steps through both backends (the Lua twin) ---------------------------------------------


def test_lone_then_repeated_through_the_backend(run_backend: BackendRunner, key_prefix: str) -> None:
    fast = Reaction(hold_s=0.05)

    async def body(backend: Backend) -> None:
        limiter = RateLimiter(backend, f"{key_prefix}:rate", 10, reaction=fast)
        other = RateLimiter(backend, f"{key_prefix}:rate", 10, reaction=fast)  # same key, same limit
        kind = await backend.gcra_throttled(limiter.key, limiter.adapt_key, limiter.rate)
        assert kind == (950_000, LONE)
        factor, kind = await backend.gcra_throttled(other.key, other.adapt_key, other.rate)
        assert kind == HELD and 950_000 <= factor <= 952_000  # climbing back at 5 % per second
        await asyncio.sleep(0.1)
        factor, kind = await backend.gcra_throttled(other.key, other.adapt_key, other.rate)
        # Three throttles against 10 qps x 30 s: repeated; too few calls since the first to place
        # the limit, so the usual cut from the level it had climbed back to.
        assert kind == REPEATED and 0.9 * 954_000 <= factor <= 0.9 * 962_000
        state = await limiter.state()
        assert state.factor_ppm == pytest.approx(factor, abs=2_000)
        grant = await backend.gcra_reserve(limiter.key, limiter.adapt_key, limiter.rate)
        assert grant.increment_us == pytest.approx(100_000 * PPM / grant.factor_ppm, abs=2)
        if isinstance(backend, RedisBackend):
            fields = await backend.client.hgetall(limiter.adapt_key)
            assert {k.decode() for k in fields} == {
                "factor_ppm", "at_us", "knee_ppm", "hold_until_us", "score", "score_at_us", "since"
            }

    run_backend(body)


def test_the_twins_agree_step_by_step(redis_url: str, key_prefix: str) -> None:
    """The Lua twin against the Python, on the same states: the Redis hash is written with each
    state, one throttle is recorded there at Redis's clock, and the result must be what
    :func:`on_throttle` gives for that state at that time."""
    from redis.asyncio import Redis

    rate = Rate(10, guard_s=0.01)
    states = [
        Adapt(950_000, -S, PPM, 0, 1.0, -S),  # lone, climbing back
        Adapt(900_000, -5 * S, 980_000, 0, 4.0, -S, 3),  # repeated, past the knee: probing
        Adapt(600_000, -2 * S, 700_000, 0, 9.0, -S, 12),  # repeated while climbing, a big share
        Adapt(800_000, -S, 800_000, 10 * S, 2.0, -S),  # holding
    ]

    async def body() -> None:
        client = Redis.from_url(redis_url)
        try:
            backend = RedisBackend(client)
            for i, template in enumerate(states):
                key = f"{key_prefix}:rate:{i}"
                sec, usec = await client.time()
                now = sec * PPM + usec
                state = Adapt(template.factor_ppm, now + template.at_us, template.knee_ppm,
                              now + template.hold_until_us, template.score, now + template.score_at_us,
                              template.since)
                await client.hset(f"{key}:adapt", mapping={
                    "factor_ppm": state.factor_ppm, "at_us": state.at_us, "knee_ppm": state.knee_ppm,
                    "hold_until_us": state.hold_until_us, "score": state.score,
                    "score_at_us": state.score_at_us, "since": state.since,
                })
                factor, kind = await backend.gcra_throttled(key, f"{key}:adapt", rate)
                after = {k.decode(): float(v) for k, v in (await client.hgetall(f"{key}:adapt")).items()}
                at = int(after["at_us"]) if kind != HELD else int(after["score_at_us"])
                expected, expected_kind = on_throttle(state, None, at, rate.calls_per_s, rate.reaction)
                assert kind == expected_kind, template
                assert after["factor_ppm"] == pytest.approx(expected.factor_ppm, abs=1), template
                assert after["knee_ppm"] == pytest.approx(expected.knee_ppm, abs=1), template
                assert after["score"] == pytest.approx(expected.score, rel=1e-6), template
                assert after["since"] == expected.since, template
                assert factor == pytest.approx(factor_at(expected, at, rate.reaction), abs=1)
        finally:
            await client.aclose()

    asyncio.run(body())


def test_an_adapt_hash_of_the_previous_release_still_reads(redis_url: str, key_prefix: str) -> None:
    """A fleet upgraded mid-night finds the old three-field state: it probes up from its factor,
    and a throttle there is taken as the real limit (the old state came from throttles)."""
    from redis.asyncio import Redis

    async def body() -> None:
        client = Redis.from_url(redis_url)
        try:
            limiter = RateLimiter(RedisBackend(client), f"{key_prefix}:rate", 10)
            sec, usec = await client.time()
            now = sec * PPM + usec
            await client.hset(limiter.adapt_key, mapping={"factor_ppm": 500_000, "at_us": now,
                                                          "hold_until_us": now})
            assert (await limiter.state()).factor_ppm == pytest.approx(500_000, abs=1_000)
            factor, kind = await limiter.backend.gcra_throttled(limiter.key, limiter.adapt_key, limiter.rate)
            assert kind == REPEATED and factor == pytest.approx(450_000, abs=1_000)
        finally:
            await client.aclose()

    asyncio.run(body())


def test_repeated_throttles_warn_once_in_a_while(caplog: pytest.LogCaptureFixture) -> None:
    """Probing against a lower real limit meets it every half minute: one warning, then INFO."""
    clock = FakeClock()
    backend = MemoryBackend(clock=clock)
    limiter = RateLimiter(backend, "k", 10, reaction=Reaction(hold_s=0))

    async def throttles() -> None:
        for _ in range(6):
            clock.now += 0.5
            await limiter.on_throttled()

    with caplog.at_level("INFO", logger="workers.ratelimit.limiter"):
        asyncio.run(throttles())
    repeated = [r for r in caplog.records if "throttles repeat" in r.getMessage()]
    assert len(repeated) >= 2 and [r.levelname for r in repeated][:2] == ["WARNING", "INFO"]
    assert "a lone throttle" in caplog.records[0].getMessage()
