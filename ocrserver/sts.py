"""The local server's own STS: temporary credentials it issues, with an expiry, and checks.

``GET /__carnumber/sts/credentials?key=ID&duration_s=N`` (loopback clients only) answers in the
credentials-URI format that ``ALIBABA_CLOUD_CREDENTIALS_URI`` reads::

    {"Code": "Success", "AccessKeyId": "STS.…", "AccessKeySecret": "…", "SecurityToken": "…",
     "Expiration": "2026-11-24T01:00:00Z", "LastUpdated": "…"}

so a worker fleet can run on rotating credentials against the local server, as on ECS or ACK.
``key`` is one of the server's keys (default: the first), whose account the temporary key shares
(QPS limit, stats); ``duration_s`` defaults to 3600 (the real STS's minimum is 900; here any
whole number of seconds from 1 is allowed, for tests); ``extra_s`` (a fault, default 0) announces
an ``Expiration`` that many seconds later than the token's real one, as a credential source with
a skewed clock would, so clients meet ``InvalidSecurityToken.Expired``.
``POST /__carnumber/sts/revoke?key=ID`` revokes every token of that key issued until now, as
revoking a role's sessions does.

Tokens are self-contained, so checking them needs no state but the revocations: the token is
``v1.<payload>.<mac>`` (payload: key id, parent key, issue and expiry times; the MAC an HMAC under
a secret of this server process), and the temporary key's secret is derived from the same secret
and the key id. A call whose AccessKeyId starts with ``STS.`` is refused, in this order, with
Alibaba Cloud's gateway codes (all HTTP 400): no ``x-acs-security-token``:
``MissingSecurityToken``; a token that does not parse or whose MAC is wrong:
``InvalidSecurityToken.Malformed``; a token of another key: ``InvalidSecurityToken.MismatchWithAccessKey``;
revoked, or its parent key unknown: ``invalidStsToken``; past its expiry:
``InvalidSecurityToken.Expired``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import Mapping
from typing import Any

from ocrserver.auth import AccessKey
from ocrserver.codes import reject

__all__ = ["STS_PREFIX", "StsIssuer"]

STS_PREFIX = "STS."
MAX_DURATION_S = 43200  # the real STS's ceiling (12 h)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def iso_utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class StsIssuer:
    """Issues and checks temporary keys derived from ``keys`` (the server's own AccessKeys)."""

    def __init__(self, keys: Mapping[str, AccessKey], secret: bytes | None = None) -> None:
        self.keys = keys
        self._secret = secret or secrets.token_bytes(32)
        self._revoked_before: dict[str, float] = {}
        self.issued = 0

    def issue(
        self, parent_id: str, duration_s: int, now: float, extra_s: int = 0
    ) -> dict[str, Any]:
        """A temporary key of ``parent_id`` valid until ``floor(now + duration_s)``, in the
        credentials-URI answer format (its ``Expiration`` ``extra_s`` later than that). Raises
        ``ValueError`` (no secret in it) for an unknown key or a duration outside 1..43200."""
        if parent_id not in self.keys:
            raise ValueError(f"key {parent_id!r} is not one of the server's keys")
        if not 1 <= duration_s <= MAX_DURATION_S:
            raise ValueError(f"duration_s must be 1..{MAX_DURATION_S}, got {duration_s}")
        key_id = STS_PREFIX + secrets.token_hex(12)
        expires = math.floor(now + duration_s)
        payload = json.dumps(
            {"id": key_id, "p": parent_id, "iat": now, "exp": expires}, separators=(",", ":")
        ).encode()
        body = _b64(payload)
        token = f"v1.{body}.{_b64(self._mac(b'token|' + body.encode()))}"
        self.issued += 1
        return {
            "Code": "Success",
            "AccessKeyId": key_id,
            "AccessKeySecret": self._key_secret(key_id),
            "SecurityToken": token,
            "Expiration": iso_utc(expires + extra_s),
            "LastUpdated": iso_utc(now),
        }

    def revoke(self, parent_id: str, now: float) -> None:
        """Refuse every token of ``parent_id`` issued until ``now`` (later ones are good)."""
        if parent_id not in self.keys:
            raise ValueError(f"key {parent_id!r} is not one of the server's keys")
        self._revoked_before[parent_id] = now

    def check(self, key_id: str, token: str | None, now: float) -> AccessKey:
        """The temporary key for a call signed by ``key_id`` carrying ``token``; otherwise raise
        the gateway's :class:`~workers.errors.ApiError` (codes in the module docstring)."""
        if not token:
            raise reject("MissingSecurityToken")
        claims = self._claims(token)
        if claims is None:
            raise reject("InvalidSecurityToken.Malformed")
        if claims["id"] != key_id:
            raise reject("InvalidSecurityToken.MismatchWithAccessKey")
        parent = claims["p"]
        if parent not in self.keys or claims["iat"] <= self._revoked_before.get(parent, -math.inf):
            raise reject("invalidStsToken")
        if now >= claims["exp"]:
            raise reject("InvalidSecurityToken.Expired")
        return AccessKey(key_id, self._key_secret(key_id), token, parent=parent)

    def _claims(self, token: str) -> dict[str, Any] | None:
        version, _, rest = token.partition(".")
        body, _, mac = rest.partition(".")
        if version != "v1" or not body or not mac:
            return None
        try:
            good = hmac.compare_digest(_unb64(mac), self._mac(b"token|" + body.encode()))
            claims = json.loads(_unb64(body)) if good else None
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(claims, dict) or not {"id", "p", "iat", "exp"} <= claims.keys():
            return None
        return claims

    def _mac(self, data: bytes) -> bytes:
        return hmac.new(self._secret, data, hashlib.sha256).digest()

    def _key_secret(self, key_id: str) -> str:
        return _b64(self._mac(b"secret|" + key_id.encode()))
