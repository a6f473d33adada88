"""Settings: read once, at start-up, from the environment and an optional TOML file.

Nothing else in the project reads ``os.environ`` for its own settings: entry points build one
:class:`Settings` with :meth:`Settings.from_env` and pass it down. Units are in the names.
This module imports nothing of ours but :mod:`workers.errors`, which imports nothing at all.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from workers.errors import ConfigError

__all__ = ["CREDENTIAL_SOURCES", "DEFAULT_ENDPOINT", "DEFAULT_REDIS_URL", "Credentials", "Settings"]

DEFAULT_ENDPOINT = "https://ocr-api.cn-hangzhou.aliyuncs.com"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# Environment variable -> Settings field. Alibaba Cloud's own names for credentials, ours for the rest.
_ENV: dict[str, str] = {
    "CARNUMBER_ENDPOINT": "endpoint",
    "ALIBABA_CLOUD_ACCESS_KEY_ID": "access_key_id",
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "access_key_secret",
    "ALIBABA_CLOUD_SECURITY_TOKEN": "security_token",
    "CARNUMBER_CREDENTIALS": "credential_source",
    "ALIBABA_CLOUD_CREDENTIALS_URI": "credentials_uri",
    "ALIBABA_CLOUD_ROLE_ARN": "role_arn",
    "ALIBABA_CLOUD_OIDC_PROVIDER_ARN": "oidc_provider_arn",
    "ALIBABA_CLOUD_OIDC_TOKEN_FILE": "oidc_token_file",
    "ALIBABA_CLOUD_ROLE_SESSION_NAME": "role_session_name",
    "ALIBABA_CLOUD_STS_REGION": "sts_region",
    "CARNUMBER_STS_ENDPOINT": "sts_endpoint",
    "ALIBABA_CLOUD_ECS_METADATA": "ecs_ram_role",
    "ALIBABA_CLOUD_PROFILE": "profile",
    "CARNUMBER_ALIYUN_CONFIG_FILE": "aliyun_config_file",
    "CARNUMBER_CONNECT_TIMEOUT_S": "connect_timeout_s",
    "CARNUMBER_READ_TIMEOUT_S": "read_timeout_s",
    "REDIS_URL": "redis_url",
    "CARNUMBER_REDIS_MASTER": "redis_master",
    "CARNUMBER_SENTINEL_PASSWORD": "sentinel_password",
    "CARNUMBER_KEY_PREFIX": "key_prefix",
    "CARNUMBER_QUEUE": "queue",
    "CARNUMBER_OUTPUT": "output",
    "CARNUMBER_CHUNK_SIZE": "chunk_size",
    "CARNUMBER_CONCURRENCY": "concurrency",
    "CARNUMBER_QUEUE_HIGH_WATER": "queue_high_water",
    "CARNUMBER_ACCOUNT": "account",
    "CARNUMBER_QPS": "qps",
    "CARNUMBER_BURST": "burst",
    "CARNUMBER_RATE_GUARD_MS": "rate_guard_ms",
    "CARNUMBER_QUOTA": "quota",
    "CARNUMBER_QUOTA_WINDOW": "quota_window",
    "CARNUMBER_RUN_DEADLINE": "run_deadline",
    "CARNUMBER_PRICE_PER_1000_CALLS": "price_per_1000_calls",
    "CARNUMBER_RETRY_BASE_S": "retry_base_s",
    "CARNUMBER_RETRY_CAP_S": "retry_cap_s",
    "CARNUMBER_MAX_ATTEMPTS": "max_attempts",
    "CARNUMBER_S3_ENDPOINT_URL": "s3_endpoint_url",
    "CARNUMBER_S3_MODE": "s3_mode",
    "CARNUMBER_OSS_ENDPOINT": "oss_endpoint",
    "CARNUMBER_OSS_MODE": "oss_mode",
    "OSS_ACCESS_KEY_ID": "oss_access_key_id",
    "OSS_ACCESS_KEY_SECRET": "oss_access_key_secret",
    "OSS_SESSION_TOKEN": "oss_security_token",
    "OSS_SECURITY_TOKEN": "oss_security_token",
    "CARNUMBER_SIGNED_URL_TTL_S": "signed_url_ttl_s",
    "CARNUMBER_SOURCE_ROOT": "source_root",
    "CARNUMBER_KEEP_QUERY_PARAMS": "keep_query_params",
    "CARNUMBER_REENCODE_ABOVE_BYTES": "reencode_above_bytes",
    "CARNUMBER_LEASE_S": "lease_s",
    "CARNUMBER_REDIS_OUTAGE_S": "redis_outage_s",
    "CARNUMBER_JOURNAL_TTL_S": "journal_ttl_s",
    "CARNUMBER_RUN_RETENTION_S": "run_retention_s",
    "CARNUMBER_SPILL_DIR": "spill_dir",
}

# Where signing credentials come from (workers/credentials.py): ``auto`` walks Alibaba Cloud's
# default chain in its order; any other value uses that one source only.
CREDENTIAL_SOURCES = (
    "auto", "static", "sts", "oidc_role_arn", "profile", "ecs_ram_role", "credentials_uri",
)

_CHOICES: dict[str, tuple[str, ...]] = {
    "credential_source": CREDENTIAL_SOURCES,
    "quota_window": ("day", "total"),
    "s3_mode": ("url", "bytes"),
    "oss_mode": ("url", "bytes"),
}


@dataclass(frozen=True, slots=True)
class Credentials:
    """An AccessKey pair, with an STS token when the key is temporary, and when it expires
    (``expiration``: Unix seconds; None for a key that does not). ``repr`` hides the secrets.

    A value, not a source: signers ask a provider (:mod:`workers.credentials`) for the current one
    at each signing and never keep it."""

    access_key_id: str
    access_key_secret: str = field(repr=False)
    security_token: str | None = field(default=None, repr=False)
    expiration: float | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a producer, worker or CLI command needs to know, validated on construction."""

    endpoint: str = DEFAULT_ENDPOINT
    access_key_id: str | None = None
    access_key_secret: str | None = field(default=None, repr=False)
    security_token: str | None = field(default=None, repr=False)
    # The credential chain (workers/credentials.py): which source, and the settings of each.
    # Alibaba Cloud's own variable names; values are read here once, the credentials themselves
    # at each signing from the provider.
    credential_source: str = "auto"
    credentials_uri: str | None = field(default=None, repr=False)
    role_arn: str | None = None
    oidc_provider_arn: str | None = None
    oidc_token_file: str | None = None
    role_session_name: str | None = None
    sts_region: str | None = None
    sts_endpoint: str | None = None
    ecs_ram_role: str | None = None
    profile: str | None = None
    aliyun_config_file: str | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0

    # May hold a password: never in repr. Parsed and checked (a ConfigError naming REDIS_URL) by
    # workers/redis_connect.py, which every client and the broker's settings go through.
    redis_url: str | None = field(default=None, repr=False)
    # With REDIS_URL=sentinel://...: the master's name and the Sentinels' own password.
    redis_master: str = "mymaster"
    sentinel_password: str | None = field(default=None, repr=False)
    key_prefix: str = "carnumber"
    queue: str = "carnumber"
    output: str = "carnumber-output"

    chunk_size: int = 200
    # Calls in flight per worker process: enough for Q = 50 at 500 ms per call on one host
    # (Little's law: 25 in flight, plus room for retries and the chunk boundary).
    concurrency: int = 32
    queue_high_water: int = 200

    # The group that shares one QPS limit, quota, stop flag and breaker: the main account's id or
    # any label. Alibaba Cloud limits the main account, shared by all its RAM users' keys; unset,
    # each AccessKeyId is its own group. See limit_group() and ops/design/rate-limit.md.
    account: str | None = None
    qps: float = 10.0
    burst: int = 1
    # Pace qps calls per (1 s + guard): a call reaching the API up to the guard late never makes
    # qps + 1 in one second (costs guard / (1 + guard) of the rate). See ops/design/rate-limit.md.
    rate_guard_ms: float = 10.0
    quota: int | None = None
    quota_window: str = "day"
    # Default deadline for `carnumber status` of runs enqueued without `--deadline`: an ISO
    # date-time, or HH:MM (UTC), the first such time after the run was created.
    run_deadline: str | None = None
    # What 1000 calls cost, in the account's currency (for `carnumber plan`); None = not shown.
    price_per_1000_calls: float | None = None

    retry_base_s: float = 0.5
    retry_cap_s: float = 30.0
    max_attempts: int = 6

    s3_endpoint_url: str | None = None
    s3_mode: str = "url"
    oss_endpoint: str | None = None
    oss_mode: str = "url"
    # OSS's own credential variables; when unset, OSS falls back to the ALIBABA_CLOUD_* pair.
    oss_access_key_id: str | None = None
    oss_access_key_secret: str | None = field(default=None, repr=False)
    oss_security_token: str | None = field(default=None, repr=False)
    signed_url_ttl_s: int = 900
    source_root: str | None = None
    # Query parameters of http(s) sources kept in messages, records and output (comma-separated
    # names; none by default). The URL as listed is fetched either way (ops/design/sources.md).
    keep_query_params: str | None = None
    reencode_above_bytes: int | None = None

    # A chunk whose worker node stopped renewing its lease this long is handed to another
    # worker (ops/design/sink.md, "Leases"); live nodes renew every lease_s / 4.
    lease_s: float = 45.0
    # How long a worker waits for an unreachable Redis (calls held, nothing parked) before it
    # exits non-zero for its supervisor to restart it.
    redis_outage_s: float = 300.0
    # Answers are kept in the journal until their part is written, at most this long.
    journal_ttl_s: int = 7 * 86400
    # How long a finished run's books stay in Redis for status, report and verify (then they
    # expire; the output keeps everything).
    run_retention_s: int = 30 * 86400
    # Where a worker keeps paid answers that Redis could not take (replayed into the journal when
    # it is back); None: ~/.cache/carnumber/spill. Keep it on a disk that outlives the process.
    spill_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.redis_master.strip():
            raise ConfigError("CARNUMBER_REDIS_MASTER: must not be blank")
        if not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(
                f"CARNUMBER_ENDPOINT={self.endpoint!r}: must start with http:// or https://"
            )
        for name in ("connect_timeout_s", "read_timeout_s", "retry_base_s", "retry_cap_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_env_name(name)}: must be > 0, got {getattr(self, name)}")
        for name in ("chunk_size", "concurrency", "queue_high_water", "burst", "max_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_env_name(name)}: must be >= 1, got {getattr(self, name)}")
        if self.lease_s < 10:
            raise ConfigError(f"CARNUMBER_LEASE_S: must be >= 10 (seconds), got {self.lease_s}")
        for name in ("redis_outage_s", "journal_ttl_s", "run_retention_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_env_name(name)}: must be > 0, got {getattr(self, name)}")
        if self.qps < 0:
            raise ConfigError(f"CARNUMBER_QPS: must be >= 0 (0 = unlimited), got {self.qps}")
        if not 0 <= self.rate_guard_ms < 1000:
            raise ConfigError(
                f"CARNUMBER_RATE_GUARD_MS: must be >= 0 and < 1000, got {self.rate_guard_ms}"
            )
        if self.quota is not None and self.quota < 0:
            raise ConfigError(f"CARNUMBER_QUOTA: must be >= 0, got {self.quota}")
        if self.account is not None and not self.account.strip():
            raise ConfigError("CARNUMBER_ACCOUNT: must not be blank (unset it to group by key)")
        if self.price_per_1000_calls is not None and self.price_per_1000_calls < 0:
            raise ConfigError(
                f"CARNUMBER_PRICE_PER_1000_CALLS: must be >= 0, got {self.price_per_1000_calls}"
            )
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{_env_name(name)}={getattr(self, name)!r}: must be one of {', '.join(allowed)}"
                )

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        config_file: str | os.PathLike[str] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Build settings from a TOML file (if given or named by ``CARNUMBER_CONFIG``), then the
        environment, then explicit ``overrides`` (CLI flags); later sources win.

        Raises :class:`ConfigError` naming the variable and the rule it broke.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        path = config_file or env.get("CARNUMBER_CONFIG")
        if path:
            values.update(_read_toml(Path(path)))
        for var, name in _ENV.items():
            raw = env.get(var)
            if raw is not None and raw != "":
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**_coerce(values))

    @property
    def broker_url(self) -> str:
        """``REDIS_URL``, or the local default: the broker and every piece of shared state."""
        return self.redis_url or DEFAULT_REDIS_URL

    def redis_access(self) -> dict[str, Any]:
        """What a Redis client needs besides the URL: ``sync_client(s.broker_url,
        **s.redis_access())`` (``workers/redis_connect.py``)."""
        return {"master_name": self.redis_master, "sentinel_password": self.sentinel_password}

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def limit_group(self) -> str:
        """The name of the group that shares one rate limit, quota, stop flag and breaker:
        ``CARNUMBER_ACCOUNT`` when set, else the AccessKeyId of a fixed key, else the account in
        ``ALIBABA_CLOUD_ROLE_ARN`` (``acs:ram::ACCOUNT:role/NAME``). Pass it to
        :func:`workers.keys.account_tag` for Redis keys. Raises :class:`ConfigError` otherwise:
        without a key there is nothing to limit, and credentials that rotate (a credentials URI,
        an ECS RAM role, a profile) change their AccessKeyId at each refresh.
        """
        if self.account:
            return self.account.strip()
        if self.access_key_id and self.credential_source in ("auto", "static", "sts"):
            return self.access_key_id
        if self.role_arn and self.credential_source in ("auto", "oidc_role_arn"):
            account = _arn_account(self.role_arn)
            if account:
                return account
        raise ConfigError(
            "CARNUMBER_ACCOUNT: needed to key the account's rate limit, quota and stop flag "
            "(set it to the main account's id); without it only a fixed "
            "ALIBABA_CLOUD_ACCESS_KEY_ID or the account in ALIBABA_CLOUD_ROLE_ARN can key them, "
            "because rotating credentials change their AccessKeyId at each refresh"
        )

    def static_credentials(self) -> Credentials | None:
        """The fixed key from ``ALIBABA_CLOUD_ACCESS_KEY_ID`` / ``_SECRET`` (with
        ``ALIBABA_CLOUD_SECURITY_TOKEN`` for an STS token), or None when neither is set. Raises
        :class:`ConfigError` naming the missing variable when only one of the pair is set."""
        if not self.access_key_id and not self.access_key_secret:
            return None
        if not self.access_key_id or not self.access_key_secret:
            missing = (
                "ALIBABA_CLOUD_ACCESS_KEY_ID" if not self.access_key_id
                else "ALIBABA_CLOUD_ACCESS_KEY_SECRET"
            )
            raise ConfigError(f"incomplete credentials: set {missing} too")
        return Credentials(self.access_key_id, self.access_key_secret, self.security_token or None)


def _arn_account(arn: str) -> str | None:
    """The account id in a RAM role ARN ``acs:ram::1234567890123456:role/name``."""
    parts = arn.split(":")
    if len(parts) >= 5 and parts[0] == "acs" and parts[1] == "ram" and parts[3].isdigit():
        return parts[3]
    return None


def _env_name(field_name: str) -> str:
    for var, name in _ENV.items():
        if name == field_name:
            return var
    return field_name


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
    section = data.get("carnumber", data)
    known = {f.name for f in fields(Settings)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return dict(section)


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    """Turn strings from the environment into each field's type, naming the variable on failure."""
    types = {f.name: f.type for f in fields(Settings)}
    out: dict[str, Any] = {}
    for name, value in values.items():
        kind = str(types[name])
        try:
            if not isinstance(value, str):
                out[name] = value
            elif kind.startswith("float"):
                out[name] = float(value)
            elif kind.startswith("int"):
                out[name] = int(value)
            else:
                out[name] = value
        except ValueError:
            want = "a number" if kind.startswith("float") else "an integer"
            raise ConfigError(f"{_env_name(name)}={value!r}: must be {want}") from None
    return out
