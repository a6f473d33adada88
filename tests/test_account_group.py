"""CARNUMBER_ACCOUNT: RAM users' keys of one account share one limit, quota, stop flag and breaker."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aredis

from workers.config import Settings
from workers.errors import ConfigError, FleetStopped
from workers.fleet import CircuitBreaker, FleetControl
from workers.keys import Keys, account_tag
from workers.ratelimit import from_settings


def _settings(key_id: str, key_prefix: str = "carnumber", **env: str) -> Settings:
    return Settings.from_env(
        {
            "ALIBABA_CLOUD_ACCESS_KEY_ID": key_id,
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": f"secret-of-{key_id}",
            "CARNUMBER_KEY_PREFIX": key_prefix,
            "CARNUMBER_QUOTA": "100",
            **env,
        }
    )


def test_limit_group_is_the_account_when_set_else_the_key() -> None:
    assert _settings("LTAI-team-a").limit_group() == "LTAI-team-a"
    grouped = _settings("LTAI-team-a", CARNUMBER_ACCOUNT=" 1234567890 ")
    assert grouped.account == " 1234567890 " and grouped.limit_group() == "1234567890"
    assert Settings(account="acct").limit_group() == "acct"  # no key needed to name the group
    with pytest.raises(ConfigError, match="CARNUMBER_ACCOUNT"):
        Settings().limit_group()
    with pytest.raises(ConfigError, match="CARNUMBER_ACCOUNT"):
        Settings(account="  ")


def test_two_keys_of_one_account_share_every_key_only_when_grouped() -> None:
    def names(s: Settings) -> tuple[str, ...]:
        limiter, quota = from_settings(s, None)
        return (
            limiter.key,
            limiter.adapt_key,
            quota.key_prefix,
            FleetControl.from_settings(None, s).key,
            CircuitBreaker.from_settings(None, s).key,
        )

    a, b = _settings("LTAI-team-a"), _settings("LTAI-team-b")
    assert all(x != y for x, y in zip(names(a), names(b), strict=True))
    env = {"CARNUMBER_ACCOUNT": "1234567890"}
    ga, gb = _settings("LTAI-team-a", **env), _settings("LTAI-team-b", **env)
    assert names(ga) == names(gb)
    tag = account_tag("1234567890")
    assert names(ga)[0] == Keys("carnumber").rate(tag)
    assert names(ga)[3] == Keys("carnumber").stop(tag)


def test_grouped_keys_share_one_limiter_quota_and_stop_in_redis(redis_url: str, key_prefix: str) -> None:
    """Against real Redis: two processes' worth of state for two keys; with the account set,
    the second key's call waits for the first's slot, the quota counts both, and one stop
    halts both."""

    async def body(env: dict[str, str]) -> tuple[float, int, bool]:
        ar = aredis.Redis.from_url(redis_url)
        try:
            sa = _settings("LTAI-team-a", key_prefix, CARNUMBER_QPS="2", **env)
            sb = _settings("LTAI-team-b", key_prefix, CARNUMBER_QPS="2", **env)
            la, qa = from_settings(sa, ar)
            lb, qb = from_settings(sb, ar)
            first = await la.acquire()
            second = await lb.acquire()
            await qa.reserve()
            await qb.reserve()
            used = await qb.used()
            await FleetControl.from_settings(ar, sa, cache_s=0).stop("Forbidden.RAM", "x", None)
            try:
                await FleetControl.from_settings(ar, sb, cache_s=0).check()
                stopped = False
            except FleetStopped:
                stopped = True
            await FleetControl.from_settings(ar, sa).clear()
            assert first.grant is not None and second.grant is not None
            return (second.grant.slot_us - first.grant.slot_us) / 1e6, used, stopped
        finally:
            await ar.aclose()

    gap, used, stopped = asyncio.run(body({"CARNUMBER_ACCOUNT": f"acct-{key_prefix}"}))
    assert gap == pytest.approx(0.5 * 1.01, abs=0.02)  # one slot of 2 qps (10 ms guard)
    assert stopped and used == 2
    gap, used, stopped = asyncio.run(body({}))
    assert gap < 0.05 and not stopped and used == 1  # each key its own limit and quota
