"""workers/redis_connect.py: the one place a REDIS_URL becomes a client or a Celery broker
setting. Parsing and the broker's settings here; the real TLS Redis, ACLs and Sentinels in
test_redis_tls.py and test_sentinel.py."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from celery.app.utils import filter_hidden_settings
from kombu import Connection
from kombu.utils.json import dumps

from workers.config import Settings
from workers.errors import ConfigError
from workers.redis_connect import (
    SecretCredentials,
    broker_access,
    broker_options,
    parse,
    redacted,
)


def test_plain_tls_unix_and_sentinel_urls() -> None:
    t = parse("redis://127.0.0.1:6380/4")
    assert (t.scheme, t.hosts, t.db, t.username, t.password, t.tls) == ("redis", (("127.0.0.1", 6380),), 4,
                                                                        None, None, None)  # fmt: skip
    t = parse("rediss://fleet:p%40ss@redis.internal/2?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=CERT_OPTIONAL")
    assert (t.hosts, t.username, t.password) == ((("redis.internal", 6379),), "fleet", "p@ss")
    assert t.tls == {"ssl_ca_certs": "/etc/ca.pem", "ssl_cert_reqs": ssl.CERT_OPTIONAL}
    assert parse("rediss://h/0").tls == {"ssl_cert_reqs": ssl.CERT_REQUIRED}  # verified by default
    t = parse("unix://:pw@/run/redis.sock?db=3")
    assert (t.scheme, t.path, t.db, t.password) == ("unix", "/run/redis.sock", 3, "pw")
    # Celery's Sentinel form: the database (and user, password, TLS) may sit on any entry.
    t = parse("sentinel://s1:26379;sentinel://s2:26380;sentinel://s3/5")
    assert t.sentinel and t.hosts == (("s1", 26379), ("s2", 26380), ("s3", 26379)) and t.db == 5
    t = parse("sentinel://u:pw@s1;sentinel://u:pw@s2/1?ssl_ca_certs=/ca.pem")
    assert (t.username, t.password, t.db) == ("u", "pw", 1)
    assert t.tls == {"ssl_ca_certs": "/ca.pem", "ssl_cert_reqs": ssl.CERT_REQUIRED}


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("http://h:6379/0", "must start with redis://, rediss://, unix:// or sentinel://"),
        ("redis://h:port/0", "the port is not a number"),
        ("redis://h/zero", "the database must be a number"),
        ("redis://:pw@h/0?ssl_ca_certs=/ca.pem", r"ssl_\* parameters need rediss://"),
        ("rediss://h/0?ssl_cert_reqs=always", "ssl_cert_reqs must be required, optional or none"),
        ("rediss://h/0?socket_timeout=3", r"unknown parameter\(s\) socket_timeout"),
        ("sentinel://s1/1;sentinel://s2/2", "the entries give different database"),
        ("sentinel://a:x@s1;sentinel://a:y@s2", "the entries give different user and password"),
        ("sentinel://s1;redis://s2", "every entry must be sentinel://"),
        ("unix://", "unix:// needs the socket's path"),
    ],
)
def test_a_bad_url_is_a_config_error_naming_redis_url_without_its_password(url: str, rule: str) -> None:
    with pytest.raises(ConfigError, match=rule) as caught:
        parse(url)
    assert str(caught.value).startswith("REDIS_URL=")
    assert "pw@" not in str(caught.value) and ":x@" not in str(caught.value)


def test_redacted_masks_every_password() -> None:
    assert redacted("rediss://fleet:secret@h:6380/0?ssl_ca_certs=/ca.pem") == (
        "rediss://fleet:***@h:6380/0?ssl_ca_certs=/ca.pem"
    )
    assert redacted("sentinel://:a@s1;sentinel://u:b@s2/0") == "sentinel://:***@s1;sentinel://u:***@s2/0"
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"


def test_settings_never_show_the_url_or_the_sentinel_password() -> None:
    s = Settings(redis_url="redis://:hunter2@h/0", sentinel_password="s3ntinel")
    assert "hunter2" not in repr(s) and "s3ntinel" not in repr(s)
    assert s.redis_access() == {"master_name": "mymaster", "sentinel_password": "s3ntinel"}
    assert Settings.from_env({"CARNUMBER_REDIS_MASTER": "carnumber-redis"}).redis_master == "carnumber-redis"
    with pytest.raises(ConfigError, match="CARNUMBER_REDIS_MASTER: must not be blank"):
        Settings.from_env({"CARNUMBER_REDIS_MASTER": " "})


def test_broker_options_for_tls_verify_unless_the_url_says_none(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-")
    assert broker_options("redis://h/0") == {"broker_url": "redis://h/0"}
    opts = broker_options(f"rediss://u:p@h:6380/1?ssl_ca_certs={ca}")
    assert opts["broker_use_ssl"] == {"ssl_ca_certs": str(ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    opts = broker_options("rediss://u:p@h:6380/1?ssl_cert_reqs=none")
    assert opts["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_NONE}
    with pytest.raises(ConfigError, match=r"ssl_ca_certs=/no/ca\.pem: no such file"):
        broker_options("rediss://h/0?ssl_ca_certs=/no/ca.pem")
    assert broker_options("unix:///run/r.sock?db=2")["broker_url"] == "redis+socket:///run/r.sock?virtual_host=2"


def test_sentinel_broker_options_repeat_the_credentials_on_every_entry_and_hide_the_sentinel_password(
    tmp_path: Path,
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-")
    url = f"sentinel://fleet:pw@s1:26379;sentinel://s2:26380/3?ssl_ca_certs={ca}"
    opts = broker_options(url, master_name="prod", sentinel_password="sentinel-secret")
    # kombu reads user, password and database from the entry it connects through, and moves to
    # the next entry when a connection fails: every entry carries them.
    assert opts["broker_url"] == (
        f"sentinel://fleet:pw@s1:26379/3?ssl_ca_certs={ca};sentinel://fleet:pw@s2:26380/3?ssl_ca_certs={ca}"
    )
    # As kombu does when a connection fails: the next entry, with the same login.
    raw = Connection("sentinel://fleet:pw@s1:26379/3;sentinel://s2:26380")
    raw.maybe_switch_next()
    assert (raw.userid, raw.password) == (None, None)  # what Celery's form alone leads to
    ours = Connection(opts["broker_url"])
    ours.maybe_switch_next()
    assert (ours.hostname, ours.userid, ours.password, ours.virtual_host) == ("s2", "fleet", "pw", "3")
    transport = opts["broker_transport_options"]
    assert transport["master_name"] == "prod"
    kwargs = transport["sentinel_kwargs"]
    assert kwargs["ssl"] is True and kwargs["ssl_ca_certs"] == str(ca)
    assert isinstance(kwargs["credential_provider"], SecretCredentials)
    assert kwargs["credential_provider"].get_credentials() == ("sentinel-secret",)
    # What a worker hands out (inspect stats: transport options as they are; inspect conf).
    for shown in (dumps(transport), repr(transport), dumps(filter_hidden_settings({"x": transport}))):
        assert "sentinel-secret" not in shown
    assert broker_access(transport) == {"master_name": "prod", "sentinel_password": "sentinel-secret"}
    assert broker_access({}) == {"master_name": "mymaster", "sentinel_password": None}


def test_celery_config_carries_the_broker_options() -> None:
    from workers.celery import celery_config

    plain = celery_config(Settings(redis_url="redis://h/0"))
    assert plain["broker_use_ssl"] is False and "master_name" not in plain["broker_transport_options"]
    conf = celery_config(
        Settings(redis_url="sentinel://:pw@s1;sentinel://s2/2", redis_master="m2", sentinel_password="sp")
    )
    assert conf["broker_url"] == "sentinel://:pw@s1:26379/2;sentinel://:pw@s2:26379/2"
    assert conf["broker_transport"] == "workers.node.broker:SentinelTransport"
    assert conf["broker_transport_options"]["master_name"] == "m2"
    assert conf["broker_transport_options"]["visibility_timeout"] > 0  # ours are kept
    shown = filter_hidden_settings(conf)
    assert "pw" not in str(shown["broker_url"]) and "sp" not in dumps(shown["broker_transport_options"])



@pytest.mark.parametrize("command", [["status"], ["worker"], ["metrics", "--once"]])
def test_commands_stop_at_start_up_on_a_bad_url(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from carnumber.cli import main as cli

    monkeypatch.setenv("REDIS_URL", "rediss://fleet:hunter2@h:6380/0?ssl_verify=yes")
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "secret")
    assert cli(command) == 2
    err = capsys.readouterr().err
    assert "REDIS_URL='rediss://fleet:***@h:6380/0?ssl_verify=yes'" in err and "unknown parameter" in err
    assert "hunter2" not in err
