"""ACS3-HMAC-SHA256 ("signature V3"), both for signing requests and for verifying them.

Pure functions over strings and bytes; no I/O, no clock. The client passes the date and nonce in,
so tests reproduce the official SDK's vectors byte for byte, and the local server verifies with
the very same canonicalisation.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

__all__ = [
    "ALGORITHM",
    "Authorization",
    "canonical_query",
    "canonical_request",
    "parse_authorization",
    "percent_encode",
    "sha256_hex",
    "sign",
    "signature",
]

ALGORITHM = "ACS3-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() if data else EMPTY_SHA256


def percent_encode(value: str) -> str:
    """RFC 3986 encoding as ACS3 wants it: only ``A-Za-z0-9-_.~`` stay, hex in upper case."""
    return quote(value, safe="-_.~", encoding="utf-8")


def canonical_query(params: Mapping[str, str]) -> str:
    return "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in sorted(params.items()))


def canonical_request(
    method: str,
    params: Mapping[str, str],
    headers: Mapping[str, str],
    signed_headers: Iterable[str],
    hashed_payload: str,
    path: str = "/",
) -> str:
    """The canonical request; ``headers`` may be in any case, ``signed_headers`` names which."""
    lower = {k.lower(): v for k, v in headers.items()}
    names = sorted(h.lower() for h in signed_headers)
    canonical_headers = "".join(f"{n}:{lower.get(n, '').strip()}\n" for n in names)
    return "\n".join(
        [
            method.upper(),
            path,
            canonical_query(params),
            canonical_headers,
            ";".join(names),
            hashed_payload,
        ]
    )


def signature(secret: str, canonical: str) -> str:
    string_to_sign = f"{ALGORITHM}\n{hashlib.sha256(canonical.encode('utf-8')).hexdigest()}"
    return hmac.new(
        secret.encode("utf-8"), string_to_sign.encode("utf-8"), hashlib.sha256
    ).hexdigest()


def default_signed_headers(headers: Mapping[str, str]) -> list[str]:
    """What we sign: ``host``, ``content-type`` and every ``x-acs-*`` header that is present."""
    return sorted(
        n
        for n in (k.lower() for k in headers)
        if n in ("host", "content-type") or n.startswith("x-acs-")
    )


def sign(
    method: str,
    params: Mapping[str, str],
    headers: Mapping[str, str],
    access_key_id: str,
    access_key_secret: str,
    signed_headers: Iterable[str] | None = None,
    path: str = "/",
) -> str:
    """The ``Authorization`` header value. ``headers`` must already hold
    ``x-acs-content-sha256``; ``signed_headers`` defaults to :func:`default_signed_headers`."""
    names = sorted(h.lower() for h in (signed_headers or default_signed_headers(headers)))
    lower = {k.lower(): v for k, v in headers.items()}
    payload = lower.get("x-acs-content-sha256", EMPTY_SHA256)
    canonical = canonical_request(method, params, lower, names, payload, path)
    sig = signature(access_key_secret, canonical)
    return f"{ALGORITHM} Credential={access_key_id},SignedHeaders={';'.join(names)},Signature={sig}"


@dataclass(frozen=True, slots=True)
class Authorization:
    access_key_id: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(value: str) -> Authorization | None:
    """Split an ``Authorization`` header; ``None`` when it is not a well-formed ACS3 value."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        return None
    fields: dict[str, str] = {}
    for item in rest.split(","):
        key, sep, val = item.strip().partition("=")
        if not sep:
            return None
        fields[key] = val
    try:
        names = tuple(n for n in fields["SignedHeaders"].split(";") if n)
        auth = Authorization(fields["Credential"], names, fields["Signature"])
    except KeyError:
        return None
    if not auth.access_key_id or not auth.signature or not names:
        return None
    return auth
