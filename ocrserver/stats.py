"""Counters behind ``GET /__carnumber/stats`` (not part of the real API; for tests and benchmarks).

``accepted`` counts calls the QPS limiter let through (signed, valid calls that were not refused
for the rate), bucketed by whole wall-clock second, overall and per key, so a benchmark can check
"never more than N accepted in any one second". ``answers`` counts what was sent back, by
``Code`` (``Success`` for a plate answer, ``(malformed)`` for a broken body, ``(reset)`` for a
dropped connection). ``faults`` counts injected faults by kind. ``pictures`` keeps, per picture
(SHA-256 of the image's bytes), when each accepted call for it was let through, so a drill can
tell a picture answered twice from one answered once (``GET /__carnumber/pictures``).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

__all__ = ["Stats"]

KEEP_SECONDS = 600  # per-second buckets kept for the JSON dump; the maxima cover all time


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.started_at = time.time()
        self.requests_total = 0
        self.answers: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.throttled = 0
        self.accepted_total = 0
        self.max_accepted_per_second = 0
        self._per_second: dict[int, int] = {}
        self._per_key: dict[str, dict[str, int]] = {}
        self._pictures: dict[str, list[float]] = {}

    def request(self) -> None:
        self.requests_total += 1

    def answer(self, code: str) -> None:
        self.answers[code] += 1

    def fault(self, kind: str) -> None:
        self.faults[kind] += 1

    def accepted(self, key_id: str, now: float) -> None:
        second = int(now)
        self.accepted_total += 1
        n = self._per_second.get(second, 0) + 1
        self._per_second[second] = n
        self.max_accepted_per_second = max(self.max_accepted_per_second, n)
        key = self._per_key.setdefault(key_id, {"accepted": 0, "second": second, "n": 0, "max": 0})
        key["accepted"] += 1
        if key["second"] != second:
            key["second"], key["n"] = second, 0
        key["n"] += 1
        key["max"] = max(key["max"], key["n"])
        if len(self._per_second) > KEEP_SECONDS * 2:
            for old in sorted(self._per_second)[:-KEEP_SECONDS]:
                del self._per_second[old]

    def picture(self, sha256: str, accepted_at: float) -> None:
        """An accepted call whose image loaded: ``accepted_at`` is when the limiter let it through."""
        self._pictures.setdefault(sha256, []).append(round(accepted_at, 3))

    def pictures_json(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self._pictures.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at,
            "uptime_s": round(time.time() - self.started_at, 3),
            "requests_total": self.requests_total,
            "answers": dict(self.answers),
            "faults": dict(self.faults),
            "accepted_total": self.accepted_total,
            "throttled": self.throttled,
            "max_accepted_per_second": self.max_accepted_per_second,
            "pictures": len(self._pictures),
            "pictures_called_twice": sum(1 for v in self._pictures.values() if len(v) > 1),
            "accepted_per_second": {str(s): n for s, n in sorted(self._per_second.items())},
            "per_key": {
                k: {"accepted": v["accepted"], "max_accepted_per_second": v["max"]}
                for k, v in self._per_key.items()
            },
        }
