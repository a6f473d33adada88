"""Server-side ACS3-HMAC-SHA256 verification, with the gateway's error codes.

The checks run in the gateway's order and stop at the first failure:

1. ``x-acs-action`` is ``RecognizeCarNumber`` (else ``InvalidAction.NotFound``, 404) and
   ``x-acs-version`` is ``2021-07-07`` (else ``InvalidVersion``);
2. ``Authorization`` is present (else ``MissingAccessKeyId``) and well formed, signing at least
   ``x-acs-date``, ``x-acs-signature-nonce`` and ``x-acs-content-sha256`` (else
   ``IncompleteSignature``); the key is known (else ``InvalidAccessKeyId.NotFound``, 404), or
   is a temporary ``STS.`` key this server issued whose token is good and not expired (the
   ``InvalidSecurityToken.*`` codes, :mod:`ocrserver.sts`);
3. ``x-acs-date`` parses (``InvalidTimeStamp.Format``) and is within 15 minutes of the server's
   clock (``InvalidTimeStamp.Expired``);
4. ``x-acs-content-sha256`` equals the body's SHA-256 and the signature, recomputed from the
   signed-header list the client names, matches (else ``SignatureDoesNotMatch``);
5. an STS token, when the key has one configured (``--keys ID:SECRET:TOKEN``), matches
   (``invalidStsToken``);
6. the nonce is new for this key (``SignatureNonceUsed``). Nonces are remembered for the 15-minute
   window only, so memory is bounded by the request rate times the window (and by ``max_nonces``).

The query is form-decoded (``+`` is a space) before canonicalisation, as the SDK form-encodes it.
"""

from __future__ import annotations

import calendar
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ocrserver.codes import reject
from workers.api.signing import canonical_request, parse_authorization, sha256_hex, signature

if TYPE_CHECKING:
    from ocrserver.sts import StsIssuer

__all__ = ["ACTION", "VERSION", "AccessKey", "NonceCache", "Verifier", "parse_keys"]

ACTION = "RecognizeCarNumber"
VERSION = "2021-07-07"
WINDOW_S = 15 * 60
_REQUIRED_SIGNED = ("x-acs-content-sha256", "x-acs-date", "x-acs-signature-nonce")


@dataclass(frozen=True, slots=True)
class AccessKey:
    """One AccessKey the server accepts; ``security_token`` set means STS calls must carry it.
    ``parent``: for a temporary key, the server's key it was issued for (its account)."""

    access_key_id: str
    access_key_secret: str = field(repr=False)
    security_token: str | None = field(default=None, repr=False)
    parent: str | None = None

    @property
    def owner(self) -> str:
        """The key whose account this one counts against: its parent, else itself."""
        return self.parent or self.access_key_id


def parse_keys(spec: str) -> dict[str, AccessKey]:
    """``ID:SECRET[:STS_TOKEN][,ID:SECRET...]`` -> keys by id. Raises ``ValueError`` (no secret
    in the message) when an entry lacks an id or a secret."""
    keys: dict[str, AccessKey] = {}
    for n, entry in enumerate(e.strip() for e in spec.split(",")):
        if not entry:
            continue
        parts = entry.split(":", 2)
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise ValueError(f"key entry {n + 1} must be ID:SECRET (optionally ID:SECRET:TOKEN)")
        keys[parts[0]] = AccessKey(parts[0], parts[1], parts[2] if len(parts) == 3 else None)
    if not keys:
        raise ValueError("no keys given: use ID:SECRET[,ID:SECRET...]")
    return keys


class NonceCache:
    """Nonces seen in the last ``window_s`` seconds, per key. Insertion order is expiry order,
    so purging is popping from the front; ``max_nonces`` caps memory even at absurd rates."""

    def __init__(self, window_s: float = WINDOW_S, max_nonces: int = 1_000_000) -> None:
        self.window_s = window_s
        self.max_nonces = max_nonces
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, key_id: str, nonce: str, now: float) -> bool:
        """Record the nonce; False when it was already seen inside the window."""
        self._purge(now)
        item = (key_id, nonce)
        if item in self._seen:
            return False
        self._seen[item] = now + self.window_s
        if len(self._seen) > self.max_nonces:
            self._seen.popitem(last=False)
        return True

    def _purge(self, now: float) -> None:
        seen = self._seen
        while seen:
            first = next(iter(seen.values()))
            if first > now:
                return
            seen.popitem(last=False)


def _parse_date(value: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%SZ")))
    except (ValueError, OverflowError):
        return None


class Verifier:
    """Verifies one request at a time; holds the keys and the nonce cache. Not thread-safe
    (the server calls it from its one event loop)."""

    def __init__(
        self,
        keys: Mapping[str, AccessKey],
        clock: Callable[[], float] = time.time,
        window_s: float = WINDOW_S,
        sts: StsIssuer | None = None,
    ) -> None:
        self.keys = dict(keys)
        self.clock = clock
        self.window_s = window_s
        self.nonces = NonceCache(window_s)
        self.sts = sts

    def verify(
        self,
        method: str,
        params: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
    ) -> AccessKey:
        """The caller's key when the request is properly signed; otherwise raise the gateway's
        :class:`~workers.errors.ApiError`. ``headers`` must have lower-case names."""
        action = headers.get("x-acs-action")
        if action != ACTION:
            raise reject("InvalidAction.NotFound")
        if headers.get("x-acs-version") != VERSION:
            raise reject("InvalidVersion")
        raw_auth = headers.get("authorization", "").strip()
        if not raw_auth:
            raise reject("MissingAccessKeyId")
        if "Credential=," in raw_auth.replace(" ", "") or raw_auth.rstrip().endswith("Credential="):
            raise reject("MissingAccessKeyId")
        auth = parse_authorization(raw_auth)
        if auth is None:
            raise reject("IncompleteSignature")
        signed = {h.lower() for h in auth.signed_headers}
        if any(h not in signed for h in _REQUIRED_SIGNED) or any(
            h not in headers for h in _REQUIRED_SIGNED
        ):
            raise reject(
                "IncompleteSignature",
                "x-acs-date, x-acs-signature-nonce and x-acs-content-sha256 must be sent and signed.",
            )
        now = self.clock()
        key = self.keys.get(auth.access_key_id)
        if key is None and self.sts is not None and auth.access_key_id.startswith("STS."):
            key = self.sts.check(auth.access_key_id, headers.get("x-acs-security-token"), now)
        if key is None:
            raise reject("InvalidAccessKeyId.NotFound")
        when = _parse_date(headers["x-acs-date"])
        if when is None:
            raise reject("InvalidTimeStamp.Format")
        if abs(now - when) > self.window_s:
            raise reject("InvalidTimeStamp.Expired")
        payload_hash = headers["x-acs-content-sha256"]
        if payload_hash.lower() != sha256_hex(body):
            raise reject("SignatureDoesNotMatch", "x-acs-content-sha256 does not match the body.")
        canonical = canonical_request(method, params, headers, auth.signed_headers, payload_hash)
        expected = signature(key.access_key_secret, canonical)
        if not hmac.compare_digest(expected, auth.signature.lower()):
            raise reject("SignatureDoesNotMatch")
        token = headers.get("x-acs-security-token")
        if token is not None:
            header_id = headers.get("x-acs-accesskey-id")
            if header_id is not None and header_id != key.access_key_id:
                raise reject("InvalidAccessKeyId.NotFound")
            if key.security_token is not None and not hmac.compare_digest(
                token.encode("utf-8"), key.security_token.encode("utf-8")
            ):
                raise reject("invalidStsToken")
        elif key.security_token is not None:
            raise reject("invalidStsToken", "This AccessKey needs x-acs-security-token.")
        if not self.nonces.add(key.access_key_id, headers["x-acs-signature-nonce"], now):
            raise reject("SignatureNonceUsed")
        return key
