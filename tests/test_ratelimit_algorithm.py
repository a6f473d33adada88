"""The rate-limit algorithm and the quota windows as plain functions: no storage, no clock."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from test_ratelimit_support import window_excess

from workers.errors import ConfigError
from workers.keys import Keys
from workers.ratelimit import gcra
from workers.ratelimit.gcra import PPM, Rate
from workers.ratelimit.quota import _zone
from workers.ratelimit.windows import DAY_S, check_window, window_key


def test_rate_validates_its_arguments() -> None:
    assert Rate(10).interval_us == 100_000
    assert Rate(3).interval_us == 333_334  # rounded up: never faster than asked
    assert Rate(0).unlimited
    for bad in (
        {"qps": -1},
        {"qps": float("inf")},
        {"qps": float("nan")},
        {"qps": 10, "burst": 0},
        {"qps": 10, "burst": 1.5},
        {"qps": 10, "guard_s": 1.0},
        {"qps": 10, "guard_s": -0.001},
    ):
        with pytest.raises(ConfigError):
            Rate(**bad)  # type: ignore[arg-type]


def test_reserve_spaces_slots_one_interval_apart_at_full_rate() -> None:
    rate = Rate(10)
    tat = None
    slots = []
    for _ in range(5):  # five callers arrive together at t = 1 s
        grant = gcra.reserve(tat, 1_000_000, rate, PPM)
        tat = grant.tat_us
        slots.append(grant.slot_us)
    assert slots == [1_000_000, 1_100_000, 1_200_000, 1_300_000, 1_400_000]
    assert gcra.reserve(tat, 1_250_000, rate, PPM).wait_s == pytest.approx(0.25)
    # After a long idle time the state is stale: the next caller goes at once.
    assert gcra.reserve(tat, 9_000_000, rate, PPM).wait_s == 0


def test_burst_lets_that_many_go_back_to_back_then_paces() -> None:
    rate = Rate(10, burst=3)
    tat = None
    waits = []
    for _ in range(5):
        grant = gcra.reserve(tat, 0, rate, PPM)
        tat = grant.tat_us
        waits.append(grant.wait_s)
    assert waits == [0, 0, 0, pytest.approx(0.1), pytest.approx(0.2)]


@pytest.mark.parametrize("burst", [1, 4])
def test_no_window_ever_holds_more_than_qps_t_plus_burst(burst: int) -> None:
    """Random arrivals, and the factor changing under way: the slots still obey the bound."""
    rng = random.Random(7)
    rate = Rate(50, burst=burst)
    tat, now, slots = None, 0, []
    for _ in range(600):
        now += int(rng.expovariate(1 / 15_000))  # arrivals faster than the limit, on average
        factor = rng.choice([PPM, PPM, 700_000, 400_000])
        grant = gcra.reserve(tat, now, rate, factor)
        assert grant.slot_us >= now
        tat = grant.tat_us
        slots.append(grant.slot_us / PPM)
    assert window_excess(slots, rate.qps, burst) <= 1e-9


def test_give_back_only_when_no_later_reservation() -> None:
    rate = Rate(10)
    first = gcra.reserve(None, 0, rate, PPM)
    second = gcra.reserve(first.tat_us, 0, rate, PPM)
    assert gcra.give_back(second.tat_us, first) is None  # someone booked after `first`
    assert gcra.give_back(second.tat_us, second) == first.tat_us
    assert gcra.give_back(None, first) is None


def test_day_window_names_the_utc_date_and_resets_at_midnight() -> None:
    noon = dt.datetime(2024, 2, 29, 12, tzinfo=dt.UTC).timestamp()
    win = window_key("p:quota:abc", "day", noon)
    assert win.key == "p:quota:abc:day:2024-02-29"
    assert win.resets_at_s == dt.datetime(2024, 3, 1, tzinfo=dt.UTC).timestamp()
    assert win.expire_at_s == win.resets_at_s + DAY_S
    # At UTC+8 the same instant is already 20:00 of that day; at 23:59:59 UTC it is the next.
    assert window_key("p", "day", noon, 8 * 3600).key == "p:day:2024-02-29"
    late = dt.datetime(2024, 2, 29, 23, 59, 59, tzinfo=dt.UTC).timestamp()
    assert window_key("p", "day", late, 8 * 3600).key == "p:day:2024-03-01"
    assert window_key("p", "day", late + 1).key == "p:day:2024-03-01"
    total = window_key("p", "total", noon)
    assert (total.key, total.resets_at_s, total.expire_at_s) == ("p:total", None, None)


def test_window_arguments_are_checked() -> None:
    check_window("day", 0)
    for window, offset in (("week", 0), ("day", DAY_S), ("day", 1.5)):
        with pytest.raises(ConfigError):
            check_window(window, offset)  # type: ignore[arg-type]
    assert _zone(0) == "UTC" and _zone(8 * 3600) == "UTC+08:00" and _zone(-5400) == "UTC-01:30"


def test_keys_give_the_quota_prefix_without_a_dangling_colon() -> None:
    keys = Keys("carnumber")
    assert keys.quota("abc") == "carnumber:quota:abc"
    assert keys.quota("abc", "total") == "carnumber:quota:abc:total"
    assert keys.rate_adapt("abc") == keys.rate("abc") + ":adapt"
