"""Fault injection: which misbehaviour, if any, a signed, valid call gets.

Rates are probabilities in 0..1. The exclusive faults (500, 503, 504, throttle, hang, reset,
malformed, error-200) share one uniform draw per call, so their rates must sum to at most 1;
``slow`` has its own draw and delays the call before whatever else happens. Both draws come from
one ``random.Random(seed)``, so a given seed and call order give the same faults every run.

A ``malformed`` call is an HTTP 200 whose body is not the documented envelope, in one of
:data:`MALFORMED_SHAPES` (:func:`malformed_body`): what a broken gateway, a captive portal or an
API change would hand a client.
"""

from __future__ import annotations

import html
import json
import random
from dataclasses import dataclass

__all__ = [
    "EXCLUSIVE_KINDS",
    "MALFORMED_SHAPES",
    "FaultConfig",
    "FaultPlan",
    "Injection",
    "malformed_body",
]

# kind -> the Code answered (None: no error body; hang answers ServiceTimeout after hang_s)
EXCLUSIVE_KINDS: dict[str, str | None] = {
    "500": "InternalError",
    "503": "ServiceUnavailable",
    "504": "ServiceTimeout",
    "throttle": "Throttling.User",
    "hang": "ServiceTimeout",
    "reset": None,
    "malformed": None,
    "error_200": None,  # the code is FaultConfig.error_200_code
}

# shape of a ``malformed`` 200 body -> what it is
MALFORMED_SHAPES: dict[str, str] = {
    "truncated": "the success envelope cut in half (invalid JSON)",
    "html": "an HTML page that echoes the request line (query string included)",
    "empty": "an empty body",
    "no-data": "JSON with a RequestId and no Data",
    "bad-data": "a Data string that is not JSON",
    "wrong-types": "a Data document whose fields have the wrong types",
}


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Rates (0..1) per fault kind, plus the parameters of slow, hang and error-200."""

    rate_500: float = 0.0
    rate_503: float = 0.0
    rate_504: float = 0.0
    rate_throttle: float = 0.0
    rate_hang: float = 0.0
    rate_reset: float = 0.0
    rate_malformed: float = 0.0
    rate_error_200: float = 0.0
    error_200_code: str = "InternalError"
    malformed_shape: str = "truncated"
    rate_slow: float = 0.0
    slow_ms: float = 0.0
    hang_s: float = 60.0

    def __post_init__(self) -> None:
        for name in (*(f"rate_{k}" for k in EXCLUSIVE_KINDS), "rate_slow"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--fault-{name[5:].replace('_', '-')}: rate must be in 0..1")
        if sum(self.rates().values()) > 1.0 + 1e-9:
            raise ValueError("the rates of 500, 503, 504, throttle, hang, reset, malformed and "
                             "error-200 faults must sum to at most 1")
        if self.malformed_shape not in MALFORMED_SHAPES:
            raise ValueError(f"--fault-malformed: shape {self.malformed_shape!r} is not one of "
                             f"{', '.join(MALFORMED_SHAPES)}")
        if self.slow_ms < 0 or self.hang_s < 0:
            raise ValueError("--fault-slow MS and --hang-s must be >= 0")

    def rates(self) -> dict[str, float]:
        return {k: getattr(self, f"rate_{k}") for k in EXCLUSIVE_KINDS}

    @property
    def active(self) -> bool:
        return self.rate_slow > 0 or any(self.rates().values())


@dataclass(frozen=True, slots=True)
class Injection:
    """What to do to one call: an optional extra delay, then an optional exclusive fault."""

    slow_ms: float = 0.0
    kind: str | None = None


class FaultPlan:
    """Draws one :class:`Injection` per call from a seeded RNG."""

    def __init__(self, config: FaultConfig, seed: int | None = None) -> None:
        self.config = config
        self.seed = seed
        self._cumulative: list[tuple[float, str]] = []
        total = 0.0
        for kind, rate in config.rates().items():
            if rate > 0:
                total += rate
                self._cumulative.append((total, kind))
        self.reseed()

    def reseed(self) -> None:
        self._rng = random.Random(self.seed)

    def draw(self) -> Injection:
        if not self.config.active:
            return Injection()
        u = self._rng.random()
        slow = self.config.slow_ms if self._rng.random() < self.config.rate_slow else 0.0
        for bound, kind in self._cumulative:
            if u < bound:
                return Injection(slow, kind)
        return Injection(slow, None)


def malformed_body(shape: str, good: bytes, request_id: str, target: str) -> bytes:
    """The body of a ``malformed`` 200 answer. ``good``: the success envelope it stands in for;
    ``target``: the request's path and query, which an ``html`` page echoes as gateway error pages
    do (so a client must keep signed query strings out of what it stores)."""
    if shape == "truncated":
        return good[: len(good) // 2]
    if shape == "html":
        return (
            "<!DOCTYPE html><html><head><title>Request blocked</title></head><body>"
            f"<h1>Request blocked</h1><p>POST {html.escape(target)}</p>"
            f"<p>Request ID: {request_id}</p></body></html>"
        ).encode()
    if shape == "empty":
        return b""
    if shape == "no-data":
        return json.dumps({"RequestId": request_id}).encode()
    if shape == "bad-data":
        return json.dumps({"RequestId": request_id, "Data": '{"width": 320, "height'}).encode()
    if shape == "wrong-types":
        data = {"data": {}, "structure_list": [], "prism_keyValueInfo": [], "width": "wide",
                "height": [240], "orgWidth": 320, "orgHeight": 240}
        return json.dumps({"RequestId": request_id, "Data": json.dumps(data)}).encode()
    raise ValueError(f"unknown malformed shape {shape!r}")
