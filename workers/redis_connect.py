"""One place that turns ``REDIS_URL`` into a client, for every part of carnumber and the broker.

::

    redis://[USER:PASSWORD@]HOST[:PORT][/DB]
    rediss://USER:PASSWORD@HOST:PORT/DB?ssl_ca_certs=CA.pem[&ssl_certfile=C.pem&ssl_keyfile=K.pem]
                                                       [&ssl_cert_reqs=required|optional|none]
    unix://[USER:PASSWORD@]/path/to/redis.sock[?db=DB]
    sentinel://[USER:PASSWORD@]HOST:26379[/DB];sentinel://HOST2:26379[/DB][?ssl_...]

The query parameters are the ones redis-py and kombu read themselves. TLS verifies the server's
certificate (and host name) unless ``ssl_cert_reqs=none`` says otherwise; kombu alone would not
verify a ``rediss://`` broker with no ``ssl_cert_reqs`` (:func:`broker_options` makes it).

With ``sentinel://`` (Celery's form: one entry per Sentinel, ``;`` between them) the user, the
password and the database are the *Redis servers'* (master and replicas, as kombu has them),
written on any entry; the Sentinels' own password is ``sentinel_password``
(``CARNUMBER_SENTINEL_PASSWORD``), the master's name ``master_name``
(``CARNUMBER_REDIS_MASTER``). ``ssl_*`` parameters put TLS on both the Sentinels and the servers.

Clients follow a failover: a Sentinel client asks the Sentinels for the master on each new
connection, and a connection to a master demoted to a replica is dropped (redis-py). Closing a
client also closes its connections to the Sentinels. Bad URLs raise :class:`ConfigError` naming
``REDIS_URL``; :func:`redacted` is the URL with its password masked, for messages.
This module imports nothing of ours but :mod:`workers.errors`.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import redis
import redis.asyncio as aredis
import redis.asyncio.sentinel as asentinel
import redis.sentinel as sentinel
from kombu.utils.json import register_type
from redis.backoff import NoBackoff
from redis.credentials import UsernamePasswordCredentialProvider
from redis.retry import Retry

from workers.errors import ConfigError

__all__ = [
    "DEFAULT_MASTER",
    "TLS_PARAMS",
    "RedisTarget",
    "SecretCredentials",
    "async_client",
    "broker_access",
    "broker_options",
    "parse",
    "redacted",
    "sync_client",
]

DEFAULT_MASTER = "mymaster"
TLS_PARAMS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_DEFAULT_PORT = {"redis": 6379, "rediss": 6379, "sentinel": 26379}
# Options of ours that also reach the Sentinels (a dead Sentinel must not hang discovery).
_SENTINEL_SOCKET_OPTS = ("socket_timeout", "socket_connect_timeout", "socket_keepalive")


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed ``REDIS_URL``. ``hosts``: the server, or every Sentinel; ``tls``: redis-py's
    ``ssl_*`` keyword arguments (``ssl_cert_reqs`` always set), None for plaintext."""

    scheme: str
    hosts: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: dict[str, Any] | None = None
    path: str | None = None  # unix://

    @property
    def sentinel(self) -> bool:
        return self.scheme == "sentinel"


def parse(url: str) -> RedisTarget:
    """Parse and check ``url``; :class:`ConfigError` naming ``REDIS_URL`` and the rule broken."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "redis+socket":  # kombu's spelling of unix:// (what broker_options gives Celery)
        url = "unix://" + url.split("://", 1)[1].replace("virtual_host=", "db=")
        scheme = "unix"
    if scheme not in ("redis", "rediss", "unix", "sentinel"):
        raise ConfigError(
            f"REDIS_URL={redacted(url)!r}: must start with redis://, rediss://, unix:// or sentinel://"
        )
    entries = [e for e in url.split(";") if e.strip()] if scheme == "sentinel" else [url]
    hosts: list[tuple[str, int]] = []
    creds: set[tuple[str | None, str | None]] = set()
    dbs: set[int] = set()
    queries: set[tuple[tuple[str, str], ...]] = set()
    path = None
    for entry in entries:
        parts = urlsplit(entry.strip())
        if parts.scheme.lower() != scheme:
            raise ConfigError(
                f"REDIS_URL={redacted(url)!r}: every entry must be {scheme}:// (got {parts.scheme}://)"
            )
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"REDIS_URL={redacted(url)!r}: the port is not a number") from None
        if parts.username or parts.password:
            creds.add((_unquoted(parts.username), _unquoted(parts.password)))
        query = tuple(sorted(parse_qsl(parts.query, keep_blank_values=True)))
        if query:
            queries.add(query)
        if scheme == "unix":
            path = parts.path
            if not path:
                raise ConfigError(f"REDIS_URL={redacted(url)!r}: unix:// needs the socket's path")
            continue
        if not parts.hostname:
            raise ConfigError(f"REDIS_URL={redacted(url)!r}: no host")
        hosts.append((parts.hostname, port or _DEFAULT_PORT[scheme]))
        db = parts.path.strip("/")
        if db:
            if not db.isdigit():
                raise ConfigError(f"REDIS_URL={redacted(url)!r}: the database must be a number, got {db!r}")
            dbs.add(int(db))
    for name, seen in (("user and password", creds), ("database", dbs), ("query parameters", queries)):
        if len(seen) > 1:
            raise ConfigError(f"REDIS_URL={redacted(url)!r}: the entries give different {name}")
    params = dict(next(iter(queries), ()))
    if scheme == "unix" and "db" in params:
        db_text = params.pop("db")
        if not db_text.isdigit():
            raise ConfigError(f"REDIS_URL={redacted(url)!r}: db= must be a number, got {db_text!r}")
        dbs.add(int(db_text))
    username, password = next(iter(creds), (None, None))
    return RedisTarget(
        scheme=scheme,
        hosts=tuple(hosts),
        db=next(iter(dbs), 0),
        username=username or None,
        password=password or None,
        tls=_tls(scheme, params, url),
        path=path,
    )


def _unquoted(text: str | None) -> str | None:
    return unquote(text) if text else None


def _tls(scheme: str, params: dict[str, str], url: str) -> dict[str, Any] | None:
    unknown = sorted(set(params) - set(TLS_PARAMS))
    if unknown:
        raise ConfigError(
            f"REDIS_URL={redacted(url)!r}: unknown parameter(s) {', '.join(unknown)} "
            f"(known: {', '.join(TLS_PARAMS)})"
        )
    if scheme in ("redis", "unix"):
        if params:
            raise ConfigError(f"REDIS_URL={redacted(url)!r}: ssl_* parameters need rediss://")
        return None
    if scheme == "sentinel" and not params:
        return None
    tls: dict[str, Any] = {k: v for k, v in params.items() if k != "ssl_cert_reqs"}
    reqs = params.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if reqs not in _CERT_REQS:
        raise ConfigError(
            f"REDIS_URL={redacted(url)!r}: ssl_cert_reqs must be required, optional or none, "
            f"got {params['ssl_cert_reqs']!r}"
        )
    tls["ssl_cert_reqs"] = _CERT_REQS[reqs]
    return tls


def redacted(url: str) -> str:
    """``url`` with every entry's password replaced by ``***`` (safe for logs and messages)."""
    out = []
    for entry in url.split(";"):
        head, sep, rest = entry.partition("://")
        userinfo, at, hostpart = rest.rpartition("@")
        if sep and at and ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        out.append(f"{head}{sep}{userinfo}{at}{hostpart}" if sep else entry)
    return ";".join(out)


def _check_files(target: RedisTarget) -> None:
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        value = (target.tls or {}).get(name)
        if value and not Path(value).is_file():
            raise ConfigError(f"REDIS_URL: {name}={value}: no such file")


def _server_kwargs(target: RedisTarget) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"db": target.db, "username": target.username, "password": target.password}
    if target.tls is not None:
        kwargs.update(ssl=True, **target.tls)
    return kwargs


def _sentinel_kwargs(
    target: RedisTarget, sentinel_password: str | None, opts: dict[str, Any]
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {k: opts[k] for k in _SENTINEL_SOCKET_OPTS if k in opts}
    if sentinel_password:
        kwargs["password"] = sentinel_password
    if target.tls is not None:
        kwargs.update(ssl=True, **target.tls)
    return kwargs


class SecretCredentials(UsernamePasswordCredentialProvider):
    """A password for Celery's transport options. Celery sends those options, as they are, to
    whoever asks a worker for its stats (``celery inspect stats``, Flower's worker page): this
    holder shows and serializes as ``***``, and redis-py (kombu's and Flower's clients) asks it
    for the password when it connects."""

    def __repr__(self) -> str:
        return "SecretCredentials(***)"


register_type(SecretCredentials, None, lambda _: "***")


class _SentinelPool(sentinel.SentinelConnectionPool):
    """Closing the client closes its Sentinel connections too (redis-py leaves them open)."""

    def close(self) -> None:
        super().close()
        self.sentinel_manager.close()


class _AsyncSentinelPool(asentinel.SentinelConnectionPool):
    async def aclose(self) -> None:
        await super().aclose()
        await self.sentinel_manager.aclose()


def sync_client(
    url: str, *, master_name: str = DEFAULT_MASTER, sentinel_password: str | None = None, **opts: Any
) -> redis.Redis:
    """A ``redis.Redis`` for ``url``; ``opts`` (timeouts, retry, ...) go to every connection."""
    target = parse(url)
    _check_files(target)
    if target.scheme == "unix":
        return redis.Redis(unix_socket_path=target.path, **_server_kwargs(target), **opts)
    if not target.sentinel:
        host, port = target.hosts[0]
        return redis.Redis(host=host, port=port, **_server_kwargs(target), **opts)
    manager = sentinel.Sentinel(
        list(target.hosts),
        sentinel_kwargs={**_sentinel_kwargs(target, sentinel_password, opts), "retry": Retry(NoBackoff(), 0)},
        **_server_kwargs(target),
    )
    return manager.master_for(master_name, connection_pool_class=_SentinelPool, **opts)


def async_client(
    url: str, *, master_name: str = DEFAULT_MASTER, sentinel_password: str | None = None, **opts: Any
) -> aredis.Redis:
    """A ``redis.asyncio.Redis`` for ``url`` (create it inside the event loop that uses it)."""
    target = parse(url)
    _check_files(target)
    if target.scheme == "unix":
        return aredis.Redis(unix_socket_path=target.path, **_server_kwargs(target), **opts)
    if not target.sentinel:
        host, port = target.hosts[0]
        return aredis.Redis(host=host, port=port, **_server_kwargs(target), **opts)
    from redis.asyncio.retry import Retry as AsyncRetry

    manager = asentinel.Sentinel(
        list(target.hosts),
        sentinel_kwargs={
            **_sentinel_kwargs(target, sentinel_password, opts),
            "retry": AsyncRetry(NoBackoff(), 0),
        },
        **_server_kwargs(target),
    )
    return manager.master_for(master_name, connection_pool_class=_AsyncSentinelPool, **opts)


def broker_options(
    url: str, *, master_name: str = DEFAULT_MASTER, sentinel_password: str | None = None
) -> dict[str, Any]:
    """Celery settings for a broker at ``url``: ``broker_url``, ``broker_use_ssl`` (certificate
    verification on unless the URL says ``ssl_cert_reqs=none``; Flower reads it too) and, for
    Sentinel, the ``broker_transport_options`` to merge (``master_name``, ``sentinel_kwargs``).

    A Sentinel URL is rewritten so that every entry carries the user, password, database and
    parameters: kombu reads them from the entry it is connected through, and moves to the next
    entry when a connection fails. A unix socket becomes kombu's ``redis+socket://``.
    """
    target = parse(url)
    _check_files(target)
    options: dict[str, Any] = {"broker_url": url}
    if target.tls is not None:
        options["broker_use_ssl"] = dict(target.tls)
    if target.scheme == "unix":
        auth = _userinfo(target)
        options["broker_url"] = f"redis+socket://{auth}{target.path}?virtual_host={target.db}"
    if target.sentinel:
        query = "&".join(f"{k}={quote(v, safe='/')}" for k, v in sorted(_raw_tls(url).items()))
        tail = f"/{target.db}" + (f"?{query}" if query else "")
        options["broker_url"] = ";".join(
            f"sentinel://{_userinfo(target)}{_netloc(host, port)}{tail}" for host, port in target.hosts
        )
        sentinel_kwargs = _sentinel_kwargs(target, None, {"socket_timeout": 5, "socket_connect_timeout": 5})
        if sentinel_password:
            sentinel_kwargs["credential_provider"] = SecretCredentials(password=sentinel_password)
        options["broker_transport_options"] = {"master_name": master_name, "sentinel_kwargs": sentinel_kwargs}
    return options


def broker_access(transport_options: dict[str, Any] | None) -> dict[str, Any]:
    """The ``master_name`` and ``sentinel_password`` that :func:`broker_options` put into Celery's
    ``broker_transport_options``: for clients made from a Celery app's configuration."""
    options = transport_options or {}
    return {
        "master_name": options.get("master_name", DEFAULT_MASTER),
        "sentinel_password": _secret(options.get("sentinel_kwargs") or {}),
    }


def _secret(sentinel_kwargs: dict[str, Any]) -> str | None:
    provider = sentinel_kwargs.get("credential_provider")
    if isinstance(provider, UsernamePasswordCredentialProvider):
        return provider.password or None
    return sentinel_kwargs.get("password")


def _userinfo(target: RedisTarget) -> str:
    if not target.username and not target.password:
        return ""
    user = quote(target.username or "", safe="")
    return f"{user}:{quote(target.password or '', safe='')}@" if target.password else f"{user}@"


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _raw_tls(url: str) -> dict[str, str]:
    for entry in url.split(";"):
        query = urlsplit(entry.strip()).query
        if query:
            return dict(parse_qsl(query))
    return {}
