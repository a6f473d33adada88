"""Signing credentials: a provider asked at each signing, refreshed before the token expires.

Signers (the API client, OSS reads) never keep credentials: they ask a :class:`Provider` for the
current ones each time they sign, as botocore's refreshable credentials do. Where they come from
is Alibaba Cloud's default credential chain, in its order, first source configured wins
(``CARNUMBER_CREDENTIALS`` names one source instead):

=================  ======================================================================
``static``         ``ALIBABA_CLOUD_ACCESS_KEY_ID`` + ``ALIBABA_CLOUD_ACCESS_KEY_SECRET``
``sts``            the same + ``ALIBABA_CLOUD_SECURITY_TOKEN`` (fixed: nothing can renew it)
``oidc_role_arn``  ``ALIBABA_CLOUD_ROLE_ARN`` + ``ALIBABA_CLOUD_OIDC_PROVIDER_ARN`` +
                   ``ALIBABA_CLOUD_OIDC_TOKEN_FILE`` (RRSA on ACK: AssumeRoleWithOIDC)
``profile``        the aliyun CLI's ``~/.aliyun/config.json`` (``ALIBABA_CLOUD_PROFILE``, else
                   its ``current``): AK, StsToken, RamRoleArn, EcsRamRole, OIDC, ... modes
``ecs_ram_role``   the instance's RAM role from the ECS metadata service
                   (``ALIBABA_CLOUD_ECS_METADATA`` names it; ``auto`` never probes unnamed)
``credentials_uri``  ``ALIBABA_CLOUD_CREDENTIALS_URI``: GET answers ``{"Code": "Success",
                   "AccessKeyId", "AccessKeySecret", "SecurityToken", "Expiration"}``
=================  ======================================================================

Everything but ``static`` and ``sts`` goes through ``alibabacloud-credentials`` (the ``cloud``
extra), which fetches; :class:`RefreshingProvider` decides *when*: from ``min(15 min, half the
lifetime)`` before expiry one caller refreshes while the others go on signing with the current
token; in the last ``min(60 s, a tenth of the lifetime)`` callers wait for the refresh. A failed
refresh keeps the current token until then and retries; after that signing raises
:class:`~workers.errors.FatalApiError` ``local.credentials`` (the fleet stops, as for a revoked
key). Credentials without an expiry from a rotating source are asked for again every minute.

Nothing here logs or raises an AccessKeyId, a secret or a token; messages from the library pass
through :func:`_safe` first.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from workers.config import Credentials, Settings
from workers.errors import ConfigError, FatalApiError
from workers.message import redact_url

__all__ = [
    "CREDENTIALS_CODE",
    "Provider",
    "RefreshingProvider",
    "StaticProvider",
    "as_provider",
    "check_credentials",
    "provider_from_settings",
    "source_of",
]

log = logging.getLogger(__name__)

# The code a fleet stops with when no usable credentials can be had (a local one: no call made).
CREDENTIALS_CODE = "local.credentials"
_INSTALL_HINT = "pip install 'carnumber[cloud]'"


class Provider(Protocol):
    """What signers ask. ``current`` is thread-safe; ``acurrent`` never blocks the event loop."""

    name: str

    def current(self) -> Credentials: ...

    async def acurrent(self) -> Credentials: ...

    def renew(self, used: Credentials) -> bool:
        """The service refused ``used`` as expired: get fresh credentials now. True when the
        provider now holds different ones (sign again), False when it cannot (a fixed key, or a
        source that hands out the same token)."""
        ...

    def discard(self, used: Credentials) -> None:
        """The service refused ``used`` for good (revoked, unknown key): the next signing waits
        for fresh credentials instead of using them again (after ``carnumber resume``)."""
        ...

    def forget(self) -> None:
        """The fleet stopped (another node's call was refused): sign the next call, after
        ``carnumber resume``, with fresh credentials. Never blocks."""
        ...


class StaticProvider:
    """A fixed key (or a fixed STS token, which nothing can renew)."""

    def __init__(self, credentials: Credentials, name: str = "static") -> None:
        self._credentials = credentials
        self.name = name

    def current(self) -> Credentials:
        return self._credentials

    async def acurrent(self) -> Credentials:
        return self._credentials

    def renew(self, used: Credentials) -> bool:
        return False

    def discard(self, used: Credentials) -> None:
        pass  # a fixed key stays the key: the operator changes it and restarts

    def forget(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class _Held:
    credentials: Credentials
    refresh_at: float  # from then on one caller refreshes; the others keep signing
    must_at: float  # from then on callers wait for a refresh (or fail)


class RefreshingProvider:
    """Credentials from ``fetch`` (which may block: HTTP, a file), kept until shortly before they
    expire. ``clock`` is wall-clock Unix seconds (expiries are wall-clock times).

    ``margin_s`` / ``must_margin_s``: refresh from ``min(margin_s, lifetime / 2)`` before expiry,
    and wait for it from ``min(must_margin_s, lifetime / 10)`` before; ``recheck_s``: how long
    credentials without an expiry are kept; ``retry_s``: the most a failed refresh waits before
    the next attempt (less for short tokens); ``wait_s``: how long a caller waits for another
    caller's refresh.
    """

    def __init__(
        self,
        fetch: Callable[[], Credentials],
        name: str,
        *,
        clock: Callable[[], float] = time.time,
        margin_s: float = 900.0,
        must_margin_s: float = 60.0,
        recheck_s: float = 60.0,
        retry_s: float = 30.0,
        wait_s: float = 30.0,
    ) -> None:
        self.name = name
        self._fetch = fetch
        self._clock = clock
        self.margin_s = margin_s
        self.must_margin_s = must_margin_s
        self.recheck_s = recheck_s
        self.retry_s = retry_s
        self.wait_s = wait_s
        self._held: _Held | None = None
        self._lock = threading.Lock()
        self.refreshes = 0  # successful fetches (for drills and tests)

    def current(self) -> Credentials:
        held = self._held
        if held is not None and self._clock() < held.refresh_at:
            return held.credentials
        must = held is None or self._clock() >= held.must_at
        if not (self._lock.acquire(timeout=self.wait_s) if must else self._lock.acquire(blocking=False)):
            if not must:
                assert held is not None
                return held.credentials  # another caller is refreshing; this token is still good
            raise self._unavailable("timed out waiting for a refresh")
        try:
            held = self._held  # another caller may have refreshed meanwhile
            now = self._clock()
            if held is not None and now < held.refresh_at:
                return held.credentials
            return self._refresh(held, now).credentials
        finally:
            self._lock.release()

    async def acurrent(self) -> Credentials:
        held = self._held
        if held is not None and self._clock() < held.refresh_at:
            return held.credentials
        return await asyncio.to_thread(self.current)

    def renew(self, used: Credentials) -> bool:
        if not self._lock.acquire(timeout=self.wait_s):
            return False
        try:
            held = self._held
            if held is not None and not _same(held.credentials, used):
                return True  # another caller already replaced the expired token
            try:
                fresh = self._fetch()
            except Exception as exc:
                log.warning("credentials from %s: refresh after an expired token failed: %s",
                            self.name, _safe(exc))
                return False
            self._held = self._schedule(fresh, self._clock())
            self.refreshes += 1
            return not _same(fresh, used)
        finally:
            self._lock.release()

    def discard(self, used: Credentials) -> None:
        held = self._held
        if held is not None and _same(held.credentials, used):
            self._held = _Held(held.credentials, -math.inf, -math.inf)

    def forget(self) -> None:
        held = self._held
        if held is not None:
            self._held = _Held(held.credentials, -math.inf, -math.inf)

    def _refresh(self, held: _Held | None, now: float) -> _Held:
        try:
            fresh = self._fetch()
        except Exception as exc:
            if held is not None and now < held.must_at:
                # Keep signing with the current token; try again soon, before it must go.
                retry_at = min(now + self._retry_in(held, now), held.must_at)
                self._held = _Held(held.credentials, retry_at, held.must_at)
                log.warning("credentials from %s: refresh failed, retrying in %.0f s: %s",
                            self.name, retry_at - now, _safe(exc))
                return self._held
            raise self._unavailable(_safe(exc)) from None
        self.refreshes += 1
        if held is not None and held.must_at == -math.inf and _same(fresh, held.credentials):
            raise self._unavailable("the source hands out the credentials the service refused")
        new = self._schedule(fresh, now)
        if held is not None and _same(fresh, held.credentials) and new.refresh_at <= now:
            # The source handed out the token it gave before: ask again later, not at once.
            new = _Held(fresh, min(now + self._retry_in(new, now), max(new.must_at, now)), new.must_at)
        self._held = new
        if fresh.expiration is not None:
            log.info("credentials from %s: refreshed, valid for %.0f s", self.name,
                     fresh.expiration - now)
        return new

    def _schedule(self, fresh: Credentials, now: float) -> _Held:
        if fresh.expiration is None:
            return _Held(fresh, now + self.recheck_s, math.inf)
        life = max(0.0, fresh.expiration - now)
        refresh_at = fresh.expiration - min(self.margin_s, life / 2)
        must_at = fresh.expiration - min(self.must_margin_s, life / 10)
        return _Held(fresh, refresh_at, must_at)

    def _retry_in(self, held: _Held, now: float) -> float:
        expiration = held.credentials.expiration
        left = (expiration - now) if expiration is not None else self.recheck_s
        return max(0.5, min(self.retry_s, left / 6))

    def _unavailable(self, why: str) -> FatalApiError:
        return FatalApiError(401, CREDENTIALS_CODE, f"no usable credentials from {self.name}: {why}")


def _same(a: Credentials, b: Credentials) -> bool:
    return (a.access_key_id, a.security_token) == (b.access_key_id, b.security_token)


# -- the chain ---------------------------------------------------------------------------------


def source_of(settings: Settings) -> str:
    """The source the chain uses for ``settings`` (``CARNUMBER_CREDENTIALS``, else the first one
    configured in Alibaba Cloud's default order). Raises :class:`ConfigError` naming the
    variables when none is."""
    if settings.credential_source != "auto":
        return settings.credential_source
    static = settings.static_credentials()
    if static is not None:
        return "sts" if static.security_token else "static"
    if settings.role_arn and settings.oidc_provider_arn and settings.oidc_token_file:
        return "oidc_role_arn"
    if settings.profile or _cli_config(settings).is_file():
        return "profile"
    if settings.ecs_ram_role:
        return "ecs_ram_role"
    if settings.credentials_uri:
        return "credentials_uri"
    raise ConfigError(
        "missing credentials: set ALIBABA_CLOUD_ACCESS_KEY_ID and ALIBABA_CLOUD_ACCESS_KEY_SECRET "
        "(and ALIBABA_CLOUD_SECURITY_TOKEN for STS credentials), or ALIBABA_CLOUD_CREDENTIALS_URI, "
        "ALIBABA_CLOUD_ROLE_ARN + ALIBABA_CLOUD_OIDC_PROVIDER_ARN + ALIBABA_CLOUD_OIDC_TOKEN_FILE, "
        "ALIBABA_CLOUD_ECS_METADATA (the ECS RAM role), or an aliyun CLI profile "
        "(~/.aliyun/config.json, ALIBABA_CLOUD_PROFILE)"
    )


def provider_from_settings(settings: Settings, **tuning: Any) -> Provider:
    """The provider for ``settings``'s credentials. No network: a source that fetches is first
    asked at the first signing. Raises :class:`ConfigError` when the source is not configured or
    ``alibabacloud-credentials`` is missing for it. ``tuning``: :class:`RefreshingProvider`'s
    keyword arguments."""
    source = source_of(settings)
    if source in ("static", "sts"):
        static = settings.static_credentials()
        if static is None:
            raise ConfigError(
                f"CARNUMBER_CREDENTIALS={source}: set ALIBABA_CLOUD_ACCESS_KEY_ID and "
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET"
                + (" and ALIBABA_CLOUD_SECURITY_TOKEN" if source == "sts" else "")
            )
        if source == "sts" and not static.security_token:
            raise ConfigError("CARNUMBER_CREDENTIALS=sts: set ALIBABA_CLOUD_SECURITY_TOKEN")
        return StaticProvider(static, source)
    inner = _library_provider(source, settings)
    return RefreshingProvider(_fetcher(inner), source, **tuning)


def check_credentials(settings: Settings) -> str:
    """Fetch credentials once (a worker's start-up check): the source's name, or a
    :class:`ConfigError` saying why none can be had."""
    provider = provider_from_settings(settings)
    try:
        provider.current()
    except FatalApiError as exc:
        raise ConfigError(exc.message) from None
    return provider.name


def as_provider(credentials: Credentials | Provider) -> Provider:
    """A provider for either a fixed :class:`Credentials` value or a provider."""
    if isinstance(credentials, Credentials):
        return StaticProvider(credentials)
    return credentials


def _cli_config(settings: Settings) -> Path:
    if settings.aliyun_config_file:
        return Path(settings.aliyun_config_file).expanduser()
    return Path(os.path.expanduser("~")) / ".aliyun" / "config.json"


def _library() -> ModuleType:
    try:
        module = importlib.import_module("alibabacloud_credentials.provider")
    except ImportError:
        raise ConfigError(
            f"alibabacloud-credentials is not installed; rotating credentials need it: {_INSTALL_HINT}"
        ) from None
    # The library gives its logger a handler of its own and logs refreshes at WARNING (and the
    # server's answer on a failure): we log what matters ourselves, with secrets taken out.
    logging.getLogger("credentials").disabled = True
    return module


def _library_provider(source: str, settings: Settings) -> Any:
    lib = _library()
    try:
        if source == "oidc_role_arn":
            missing = [
                var for var, value in (
                    ("ALIBABA_CLOUD_ROLE_ARN", settings.role_arn),
                    ("ALIBABA_CLOUD_OIDC_PROVIDER_ARN", settings.oidc_provider_arn),
                    ("ALIBABA_CLOUD_OIDC_TOKEN_FILE", settings.oidc_token_file),
                ) if not value
            ]
            if missing:
                raise ConfigError(f"CARNUMBER_CREDENTIALS=oidc_role_arn: set {' and '.join(missing)}")
            return lib.OIDCRoleArnCredentialsProvider(
                role_arn=settings.role_arn,
                oidc_provider_arn=settings.oidc_provider_arn,
                oidc_token_file_path=settings.oidc_token_file,
                role_session_name=settings.role_session_name or "carnumber",
                sts_region_id=settings.sts_region,
                sts_endpoint=settings.sts_endpoint,
            )
        if source == "profile":
            path = _cli_config(settings)
            if not path.is_file():
                raise ConfigError(f"aliyun CLI profile: {path} not found")
            return lib.CLIProfileCredentialsProvider(
                profile_name=settings.profile, profile_file=str(path)
            )
        if source == "ecs_ram_role":
            # Refreshed by us, not by the library's background scheduler thread.
            return lib.EcsRamRoleCredentialsProvider(
                role_name=settings.ecs_ram_role, async_update_enabled=False
            )
        if source == "credentials_uri":
            if not settings.credentials_uri:
                raise ConfigError("CARNUMBER_CREDENTIALS=credentials_uri: set ALIBABA_CLOUD_CREDENTIALS_URI")
            return lib.URLCredentialsProvider(uri=settings.credentials_uri)
    except ValueError as exc:  # the library validates its arguments eagerly
        raise ConfigError(f"credentials ({source}): {_safe(exc)}") from None
    raise ConfigError(f"CARNUMBER_CREDENTIALS={source!r}: not a credential source")


def _fetcher(inner: Any) -> Callable[[], Credentials]:
    """``inner.get_credentials()`` as our :class:`Credentials` (with the expiry when the source
    gives one)."""

    def fetch() -> Credentials:
        got = inner.get_credentials()
        key_id, secret = got.get_access_key_id(), got.get_access_key_secret()
        if not key_id or not secret:
            raise ValueError("the source answered without an AccessKeyId or secret")
        expiration = getattr(got, "get_expiration", lambda: None)()
        return Credentials(
            key_id, secret, got.get_security_token() or None,
            float(expiration) if expiration is not None and expiration > 0 else None,
        )

    return fetch


_SECRET_FIELD = re.compile(
    r"""(["']?(?:AccessKeySecret|SecurityToken|AccessKeyId|access_key_secret|sts_token|OIDCToken)["']?\s*[:=]\s*)"""
    r"""("[^"]*"|'[^']*'|[^\s,}&]+)""",
    re.IGNORECASE,
)
_URL = re.compile(r"https?://[^\s\"'<>]+")


def _safe(exc: BaseException | str, limit: int = 300) -> str:
    """An error's text with credential fields masked and URLs' query secrets removed."""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}".rstrip(": ")
    text = _SECRET_FIELD.sub(lambda m: m.group(1) + "***", text)
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
