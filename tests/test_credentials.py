"""The credential chain (workers/credentials.py): which source, when it refreshes, and each source
for real: the local server's STS as a credentials URI, an aliyun CLI profile file, the ECS
metadata service (a loopback server reached as the HTTP proxy the library honours, so nothing
leaves the machine). The refresh policy itself runs on an injected clock."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from workers.config import Credentials, Settings
from workers.credentials import (
    CREDENTIALS_CODE,
    RefreshingProvider,
    StaticProvider,
    check_credentials,
    provider_from_settings,
    source_of,
)
from workers.errors import ConfigError, FatalApiError

NO_CLI = "/nonexistent/aliyun-config.json"


# -- the refresh policy, on a clock we move ---------------------------------------------------


class Source:
    """Hands out a new token on each fetch, valid ``life_s`` from the clock's now."""

    def __init__(self, clock: list[float], life_s: float | None = 30.0) -> None:
        self.clock, self.life_s, self.fetches, self.fail = clock, life_s, 0, False

    def __call__(self) -> Credentials:
        if self.fail:
            raise OSError("connection refused by http://127.0.0.1:1/creds?token=abc")
        self.fetches += 1
        exp = None if self.life_s is None else self.clock[0] + self.life_s
        return Credentials(f"STS.{self.fetches}", "secret", f"tok{self.fetches}", exp)


def _provider(life_s: float | None = 30.0) -> tuple[RefreshingProvider, Source, list[float]]:
    clock = [1000.0]
    source = Source(clock, life_s)
    return RefreshingProvider(source, "test", clock=lambda: clock[0]), source, clock


def test_refreshes_from_half_the_lifetime_before_expiry_and_not_before() -> None:
    p, source, clock = _provider(30.0)
    assert p.current().access_key_id == "STS.1"
    clock[0] += 14.9
    assert p.current().access_key_id == "STS.1" and source.fetches == 1
    clock[0] += 0.2  # 15 s left: refresh
    assert p.current().access_key_id == "STS.2" and source.fetches == 2
    # An hour-long token is refreshed 15 minutes before it expires (as botocore and the SDK do).
    p, source, clock = _provider(3600.0)
    p.current()
    clock[0] += 2699
    p.current()
    assert source.fetches == 1
    clock[0] += 2
    p.current()
    assert source.fetches == 2


def test_a_failed_refresh_keeps_the_token_until_it_must_go_then_stops() -> None:
    p, source, clock = _provider(30.0)
    p.current()
    source.fail = True
    clock[0] += 16  # in the refresh window: the current token is still good
    assert p.current().access_key_id == "STS.1"
    clock[0] += 11.5  # 2.5 s left, past min(60 s, life / 10) = 3 s: callers must wait, and it fails
    with pytest.raises(FatalApiError) as info:
        p.current()
    assert info.value.code == CREDENTIALS_CODE
    assert "token=abc" not in info.value.message and "127.0.0.1:1/creds" in info.value.message
    source.fail = False
    assert p.current().access_key_id == "STS.2"  # the source is back: so is signing


def test_credentials_without_an_expiry_are_asked_for_again_every_minute() -> None:
    p, source, clock = _provider(None)
    p.current()
    clock[0] += 59
    p.current()
    assert source.fetches == 1
    clock[0] += 2
    p.current()
    assert source.fetches == 2


def test_many_threads_at_the_refresh_point_fetch_once() -> None:
    clock = [1000.0]
    gate = threading.Event()

    class Slow(Source):
        def __call__(self) -> Credentials:
            gate.wait(5)
            return super().__call__()

    source = Slow(clock, 30.0)
    p = RefreshingProvider(source, "test", clock=lambda: clock[0])
    gate.set()
    p.current()
    gate.clear()
    clock[0] += 20  # refresh window, not yet "must"
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(p.current().access_key_id)) for _ in range(16)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(5)
    assert source.fetches == 2  # one refresh for sixteen callers; the others signed with STS.1
    assert len(got) == 16 and set(got) <= {"STS.1", "STS.2"}


def test_renew_after_an_expired_answer_and_discard_after_a_refusal() -> None:
    p, source, clock = _provider(30.0)
    used = p.current()
    assert p.renew(used) is True and source.fetches == 2
    assert p.renew(used) is True and source.fetches == 2  # another caller already renewed it
    # A source that hands out the same token cannot renew it.
    same = RefreshingProvider(lambda: used, "fixed", clock=lambda: clock[0])
    assert same.renew(same.current()) is False
    # Refused for good: the next signing waits for a fresh token (or fails when none comes).
    fresh = p.current()
    p.discard(fresh)
    assert p.current().access_key_id == "STS.3"
    same.discard(used)
    with pytest.raises(FatalApiError, match="refused"):
        same.current()
    assert StaticProvider(used).renew(used) is False


def test_the_event_loop_path_refreshes_in_a_thread() -> None:
    p, source, clock = _provider(30.0)

    async def sign_twice() -> list[str]:
        first = (await p.acurrent()).access_key_id
        clock[0] += 20
        return [first, (await p.acurrent()).access_key_id]  # fetched in a worker thread

    assert asyncio.run(sign_twice()) == ["STS.1", "STS.2"]
    assert source.fetches == 2


# -- which source ------------------------------------------------------------------------------


def test_the_chain_picks_the_first_configured_source_in_alibaba_s_order(tmp_path: Path) -> None:
    cli = tmp_path / "config.json"
    base = {"aliyun_config_file": str(cli)}
    uri = {"credentials_uri": "http://127.0.0.1:9/creds"}
    oidc = {
        "role_arn": "acs:ram::1234567890123456:role/ocr",
        "oidc_provider_arn": "acs:ram::1234567890123456:oidc-provider/ack",
        "oidc_token_file": str(tmp_path / "token"),
    }
    assert source_of(Settings(**base, **uri)) == "credentials_uri"
    assert source_of(Settings(**base, **uri, ecs_ram_role="r")) == "ecs_ram_role"
    cli.write_text("{}")
    assert source_of(Settings(**base, **uri, ecs_ram_role="r")) == "profile"
    assert source_of(Settings(**base, **uri, **oidc)) == "oidc_role_arn"
    keys = {"access_key_id": "id", "access_key_secret": "s"}
    assert source_of(Settings(**base, **uri, **oidc, **keys)) == "static"
    assert source_of(Settings(**base, **keys, security_token="t")) == "sts"
    forced = Settings(**base, **keys, credential_source="credentials_uri", **uri)
    assert source_of(forced) == "credentials_uri"
    with pytest.raises(ConfigError, match="CARNUMBER_CREDENTIALS"):
        Settings(credential_source="magic")


def test_missing_or_half_set_credentials_name_the_variables() -> None:
    with pytest.raises(ConfigError) as info:
        provider_from_settings(Settings(aliyun_config_file=NO_CLI))
    for var in ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_CREDENTIALS_URI", "ALIBABA_CLOUD_ROLE_ARN",
                "ALIBABA_CLOUD_ECS_METADATA", "~/.aliyun/config.json"):  # fmt: skip
        assert var in str(info.value)
    with pytest.raises(ConfigError, match="ALIBABA_CLOUD_ACCESS_KEY_SECRET"):
        provider_from_settings(Settings(access_key_id="id"))
    with pytest.raises(ConfigError, match="ALIBABA_CLOUD_OIDC_TOKEN_FILE"):
        provider_from_settings(Settings(credential_source="oidc_role_arn", role_arn="acs:ram::1:role/x",
                                        oidc_provider_arn="p"))  # fmt: skip
    with pytest.raises(ConfigError, match="ALIBABA_CLOUD_SECURITY_TOKEN"):
        provider_from_settings(Settings(credential_source="sts", access_key_id="i", access_key_secret="s"))


def test_rotating_credentials_need_an_account_to_key_the_shared_limit() -> None:
    uri = Settings(credentials_uri="http://127.0.0.1:9/c", aliyun_config_file=NO_CLI)
    with pytest.raises(ConfigError, match="CARNUMBER_ACCOUNT"):
        uri.limit_group()
    assert uri.with_(account="1234").limit_group() == "1234"
    oidc = Settings(role_arn="acs:ram::1234567890123456:role/ocr")
    assert oidc.limit_group() == "1234567890123456"  # the account is in the role's ARN
    assert Settings(access_key_id="LTAIkey", access_key_secret="s").limit_group() == "LTAIkey"


# -- each source for real --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sts_server() -> Iterator[Any]:
    from ocrserver.server import ServerConfig, start_server

    with start_server(ServerConfig(keys="parent:parent-secret")) as server:
        yield server


def test_a_credentials_uri_rotates_for_real(sts_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    uri = f"{sts_server.url}/__carnumber/sts/credentials?key=parent&duration_s=2"
    p = provider_from_settings(Settings(credentials_uri=uri, aliyun_config_file=NO_CLI))
    first = p.current()
    assert first.access_key_id.startswith("STS.") and first.security_token and first.expiration
    assert 0 < first.expiration - time.time() <= 2
    time.sleep(1.2)  # past half its lifetime
    second = p.current()
    assert second.access_key_id != first.access_key_id
    assert check_credentials(Settings(credentials_uri=uri, aliyun_config_file=NO_CLI)) == "credentials_uri"
    for secret in (first.access_key_secret, first.security_token, second.security_token,
                   first.access_key_id):  # fmt: skip
        assert secret not in caplog.text


def test_a_credentials_uri_that_fails_says_why_without_secrets(sts_server: Any) -> None:
    bad = f"{sts_server.url}/__carnumber/sts/credentials?key=nobody&token=hush"
    with pytest.raises(ConfigError) as info:
        check_credentials(Settings(credentials_uri=bad, aliyun_config_file=NO_CLI))
    assert "credentials_uri" in str(info.value) and "hush" not in str(info.value)


def test_an_aliyun_cli_profile_file(tmp_path: Path) -> None:
    cli = tmp_path / "config.json"
    cli.write_text(json.dumps({"current": "ak", "profiles": [
        {"name": "ak", "mode": "AK", "access_key_id": "LTAIcli", "access_key_secret": "cli-secret"},
        {"name": "sts", "mode": "StsToken", "access_key_id": "STS.cli", "access_key_secret": "s2",
         "sts_token": "cli-token"},
    ]}))  # fmt: skip
    got = provider_from_settings(Settings(aliyun_config_file=str(cli))).current()
    assert (got.access_key_id, got.access_key_secret, got.security_token) == ("LTAIcli", "cli-secret", None)
    got = provider_from_settings(Settings(aliyun_config_file=str(cli), profile="sts")).current()
    assert (got.access_key_id, got.security_token) == ("STS.cli", "cli-token")
    with pytest.raises(ConfigError, match="nope"):
        check_credentials(Settings(aliyun_config_file=str(cli), profile="nope"))


class _Metadata(BaseHTTPRequestHandler):
    """The ECS metadata service's RAM-role routes (IMDSv2 token first), reached as an HTTP proxy:
    requests arrive with absolute URIs for http://100.100.100.200/..."""

    seen: ClassVar[list[str]] = []

    def log_message(self, *_: Any) -> None:
        pass

    def _answer(self) -> None:
        self.seen.append(f"{self.command} {self.path}")
        if self.command == "PUT" and self.path.endswith("/latest/api/token"):
            body = b"imds-token"
        elif self.headers.get("X-aliyun-ecs-metadata-token") != "imds-token":
            self.send_response(401)
            self.end_headers()
            return
        elif self.path.endswith("/security-credentials/ocr-role"):
            exp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
            body = json.dumps({"Code": "Success", "AccessKeyId": "STS.ecs", "AccessKeySecret": "ecs-secret",
                               "SecurityToken": "ecs-token", "Expiration": exp}).encode()  # fmt: skip
        else:
            body = b"ocr-role"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = _answer


def test_an_ecs_ram_role_from_the_metadata_service(monkeypatch: pytest.MonkeyPatch) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        for role in ("ocr-role", None):  # named, or found in the metadata (CARNUMBER_CREDENTIALS)
            settings = Settings(ecs_ram_role=role, credential_source="ecs_ram_role")
            got = provider_from_settings(settings).current()
            assert (got.access_key_id, got.security_token) == ("STS.ecs", "ecs-token")
            assert got.expiration and 3590 < got.expiration - time.time() <= 3600
    finally:
        server.shutdown()
        server.server_close()
    assert "GET http://100.100.100.200/latest/meta-data/ram/security-credentials/" in _Metadata.seen


def test_a_node_that_sees_the_fleet_stopped_signs_with_fresh_credentials_after_resume() -> None:
    # Another node's call was refused (a revoked token): this node, which made no call, must not
    # sign the first call after `carnumber resume` with the token it holds.
    p, source, _clock = _provider(30.0)
    assert p.current().access_key_id == "STS.1"
    p.forget()
    assert p.current().access_key_id == "STS.2" and source.fetches == 2
    StaticProvider(p.current()).forget()  # a fixed key stays the key
