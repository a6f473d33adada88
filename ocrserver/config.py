"""``ServerConfig``: everything ``carnumber serve`` and :func:`ocrserver.server.start_server` take.

Built once (from CLI flags or by a test) and passed down; nothing in the server reads the
environment. Units are in the names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ocrserver.auth import AccessKey, parse_keys
from ocrserver.faults import FaultConfig
from ocrserver.intake import LOOPBACK_HOSTS
from workers.errors import ConfigError

__all__ = ["DEFAULT_KEYS", "ServerConfig"]

DEFAULT_KEYS = "testid:testsecret"


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one local server.

    ``keys`` is ``ID:SECRET[:STS_TOKEN][,...]``; ``port=0`` picks a free port; ``qps=0`` means no
    limit; ``accounts`` (``ID=ACCOUNT[,...]``) names the main account of some keys: keys of one
    account share one ``qps`` limit, as RAM users' keys do on the real service (a key not named
    is its own account); ``allowed_url_hosts`` are the only hosts a ``Url`` image may be fetched from;
    ``throttle_retry_after`` adds ``x-acs-retry-after`` (ms) to QPS refusals; ``throttle_random``
    (0..1) refuses that share of calls with ``Throttling.User`` at random at the gateway, within
    ``qps`` and not counted against it (a real gateway's own windows and clocks); ``expand_refs``
    writes the first ``structure_list`` entry in full instead of ``{"$ref": "$.data"}``.
    """

    host: str = "127.0.0.1"
    port: int = 0
    keys: str = field(default=DEFAULT_KEYS, repr=False)
    qps: float = 0
    accounts: str = ""
    recognizer: str = "replay"
    truth_path: str | None = None
    model_dir: str | None = None
    allowed_url_hosts: frozenset[str] = LOOPBACK_HOSTS
    url_timeout_s: float = 5.0
    latency_ms: float = 0.0
    faults: FaultConfig = field(default_factory=FaultConfig)
    seed: int | None = None
    throttle_retry_after: bool = False
    throttle_random: float = 0.0
    expand_refs: bool = False
    max_batch: int = 8
    max_wait_ms: float = 5.0
    graceful_shutdown_s: int = 1
    log_level: str = "warning"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: must be 0..65535")
        if self.qps < 0 or self.qps != int(self.qps):
            raise ConfigError(
                f"--qps {self.qps}: must be a whole number >= 0 (0 = unlimited): the limit is "
                "counted per whole second"
            )
        if self.latency_ms < 0 or self.url_timeout_s <= 0:
            raise ConfigError("--latency-ms must be >= 0 and the URL timeout > 0")
        if not 0 <= self.throttle_random <= 1:
            raise ConfigError(f"--throttle-random {self.throttle_random}: a share, 0..1")
        if self.max_batch < 1 or self.max_wait_ms < 0:
            raise ConfigError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.access_keys()  # validate now, not on the first request
        self.account_of()
        object.__setattr__(
            self, "allowed_url_hosts", frozenset(h.lower() for h in self.allowed_url_hosts)
        )

    def account_of(self) -> dict[str, str]:
        """AccessKeyId -> the account whose QPS limit it shares, from ``accounts``. Raises
        :class:`ConfigError` for a malformed entry or a key not in ``keys``."""
        out: dict[str, str] = {}
        known = self.access_keys()
        for item in filter(None, (p.strip() for p in self.accounts.split(","))):
            key_id, sep, account = item.partition("=")
            if not sep or not key_id.strip() or not account.strip():
                raise ConfigError(f"--accounts: {item!r} is not ID=ACCOUNT")
            if key_id.strip() not in known:
                raise ConfigError(f"--accounts: {key_id.strip()!r} is not one of --keys")
            out[key_id.strip()] = account.strip()
        return out

    def access_keys(self) -> dict[str, AccessKey]:
        try:
            return parse_keys(self.keys)
        except ValueError as exc:
            raise ConfigError(f"--keys / CARNUMBER_SERVER_KEYS: {exc}") from None
