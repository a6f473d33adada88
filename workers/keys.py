"""Every Redis key the project uses, in one place.

All keys start with the configured prefix (``CARNUMBER_KEY_PREFIX``, default ``carnumber``), so
one Redis can host several deployments and tests can clean exactly their own keys. Keys that
belong to an account use a digest of the AccessKeyId, never the id itself.
"""

from __future__ import annotations

import hashlib

__all__ = ["Keys", "account_tag"]


def account_tag(access_key_id: str) -> str:
    """A short, stable, non-reversible name for an account in keys, logs and metrics."""
    return hashlib.sha256(access_key_id.encode("utf-8")).hexdigest()[:12]


class Keys:
    """Key names under one prefix. Pure string building; no Redis here."""

    def __init__(self, prefix: str = "carnumber") -> None:
        self.prefix = prefix.rstrip(":")

    # -- fleet-wide, per account -------------------------------------------------------------
    def rate(self, account: str) -> str:
        """GCRA state: the theoretical arrival time of the next call, microseconds of Redis
        ``TIME`` (see ops/design/rate-limit.md)."""
        return f"{self.prefix}:rate:{account}"

    def rate_adapt(self, account: str) -> str:
        """Adaptive slow-down state after throttling answers (hash ``factor_ppm``, ``at_us``);
        the rate limiter derives it as ``rate(account) + ":adapt"``."""
        return f"{self.prefix}:rate:{account}:adapt"

    def quota(self, account: str, window: str = "") -> str:
        """Calls reserved in one quota window (``day:2026-11-24`` or ``total``); with no window,
        the prefix that ``CallQuota`` extends with the window itself."""
        base = f"{self.prefix}:quota:{account}"
        return f"{base}:{window}" if window else base

    def stop(self, account: str) -> str:
        """Set when a fatal error stops the fleet; a hash with code, message and time."""
        return f"{self.prefix}:stop:{account}"

    def circuit(self, account: str) -> str:
        return f"{self.prefix}:circuit:{account}"

    def calls(self, account: str, bucket: str) -> str:
        """Hash of API call counts by outcome code: ``total`` or one UTC minute (``m:202611241305``)."""
        return f"{self.prefix}:calls:{account}:{bucket}"

    def in_flight(self, account: str) -> str:
        """Hash worker process -> ``"calls unix_s"``: calls each has in flight, as of when."""
        return f"{self.prefix}:inflight:{account}"

    def watch(self) -> str:
        """Who runs this round of the stalled-run repair (``workers/node/watchdog.py``)."""
        return f"{self.prefix}:watch"

    # -- per run ------------------------------------------------------------------------------
    def runs(self) -> str:
        """Sorted set of run ids by creation time."""
        return f"{self.prefix}:runs"

    def run(self, run_id: str) -> str:
        """Hash: state, counters and timestamps of one run."""
        return f"{self.prefix}:run:{run_id}"

    def run_chunks(self, run_id: str) -> str:
        """Hash chunk id -> digest of its refs, for chunks already published (re-runs skip them)."""
        return f"{self.prefix}:run:{run_id}:chunks"

    def run_sources(self, run_id: str) -> str:
        """Hash source -> chunk id prefix, for each source enqueued into a run (the first: "")."""
        return f"{self.prefix}:run:{run_id}:sources"

    def run_done(self, run_id: str) -> str:
        """Set of part names written for a run."""
        return f"{self.prefix}:run:{run_id}:done"

    def run_outcomes(self, run_id: str) -> str:
        """Hash chunk id -> bitmap of the chunk's images (by position) that have their outcome
        (``workers/books/outcomes.py``)."""
        return f"{self.prefix}:run:{run_id}:outcomes"

    def run_parked(self, run_id: str) -> str:
        """Hash remainder part name -> chunk message set aside while the run or the fleet was
        held (pause, quota, stop); ``carnumber resume`` publishes them again."""
        return f"{self.prefix}:run:{run_id}:parked"

    def run_parked_images(self, run_id: str) -> str:
        """Hash remainder part name -> number of images in it (``run_parked``'s sizes)."""
        return f"{self.prefix}:run:{run_id}:parked_images"

    def run_repaired(self, run_id: str) -> str:
        """Set of chunk ids republished once by the stalled-run repair (``workers/books/repair.py``)."""
        return f"{self.prefix}:run:{run_id}:repaired"

    def run_enqueues(self, run_id: str) -> str:
        """Hash source -> JSON of its enqueue: state (running, complete, incomplete), images
        published, the command that finishes it, and a heartbeat (``workers/books/runs.py``)."""
        return f"{self.prefix}:run:{run_id}:enqueues"

    def run_answers(self, run_id: str) -> str:
        """Hash image id -> journalled answer (``workers/books/journal.py``): every paid answer from the
        moment it arrives until its part is written."""
        return f"{self.prefix}:run:{run_id}:answers"

    def claim(self, run_id: str, image_id: str) -> str:
        """Who is calling the API for one image right now (a short-lived token)."""
        return f"{self.prefix}:claim:{run_id}:{image_id}"

    def run_control(self, run_id: str) -> str:
        """``paused`` or ``cancelled`` while an operator holds the run (``workers/books/control.py``)."""
        return f"{self.prefix}:run:{run_id}:control"

    def run_events(self, run_id: str) -> str:
        """Stream of notable events (stops, quota, alerts) for operators."""
        return f"{self.prefix}:run:{run_id}:events"

    # -- per image ----------------------------------------------------------------------------
    def sealed_url(self, image_id: str) -> str:
        """The URL as listed for an http(s) image whose source dropped query parameters (a
        signature): written by the producer, read by workers (``workers/storage/sealed.py``)."""
        return f"{self.prefix}:sealed:{image_id}"
