"""Fleet-wide switches of one account: the stop flag (fatal errors) and the circuit breaker.

Both live in Redis so that every worker of every host sees the same state, and both are cheap
to consult before each call: a worker keeps what it last read for ``cache_s`` (0.5 s by default),
so a thousand calls a second cost a couple of Redis round trips, and a stop or an opened circuit
reaches every worker within about that long.

* :class:`FleetControl` — set once by the first fatal answer (bad credentials, signature, billing);
  every worker then raises :class:`FleetStopped` at the gate until an operator clears it
  (``carnumber resume RUN_ID``). The first stop wins; later stops change nothing.
* :class:`CircuitBreaker` — keeps the outcomes of the last ``window`` calls; when at least
  ``min_calls`` are known and ``failure_ratio`` of them failed, it opens: the gate raises
  :class:`CircuitOpen`. After ``cooldown_s`` exactly one probe call goes through, fleet-wide
  (half-open); its success closes the circuit, its failure opens it for another cooldown.

State changes are atomic Lua scripts next to this module (``fleet_*.lua``) that read the time
from Redis itself. Pass ``redis=None`` for a process-local twin with the same behaviour (unit
tests, a single process): the state then lives in this module, shared by instances with the same
keys. Redis errors become :class:`~workers.errors.RedisUnavailable` at the gate (no call without
coordination; the pipeline waits for Redis). See ``ops/design/retries.md``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from workers.errors import CircuitOpen, FleetStopped, RedisUnavailable
from workers.keys import Keys, account_tag
from workers.retry import safe_message

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from workers.config import Settings

__all__ = ["CircuitBreaker", "FleetControl"]

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_TTL_S = 24 * 3600.0  # circuit state of an idle account is forgotten after a day


def _lua(name: str) -> str:
    return (_HERE / name).read_text(encoding="utf-8")


def _str(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _RedisBackend:
    """The shared state: one hash per switch, changed only by the Lua scripts."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._stop = redis.register_script(_lua("fleet_stop.lua"))
        self._check = redis.register_script(_lua("fleet_circuit_check.lua"))
        self._record = redis.register_script(_lua("fleet_circuit_record.lua"))

    async def stop(self, key: str, code: str, message: str, run: str) -> tuple[bool, str, str]:
        won, held_code, held_message = await self._stop(keys=[key], args=[code, message, run])
        return bool(int(won)), _str(held_code), _str(held_message)

    async def read(self, key: str) -> dict[str, str] | None:
        raw = await self.redis.hgetall(key)
        return {_str(k): _str(v) for k, v in raw.items()} or None

    async def delete(self, key: str) -> None:
        await self.redis.delete(key)

    async def circuit_check(
        self, key: str, cooldown_ms: int, probe_ms: int, ttl_ms: int
    ) -> tuple[int, int]:
        verdict, wait_ms = await self._check(keys=[key], args=[cooldown_ms, probe_ms, ttl_ms])
        return int(verdict), int(wait_ms)

    async def circuit_record(
        self, key: str, ok: bool, window: int, min_calls: int, ratio: float, ttl_ms: int
    ) -> str:
        args = ["1" if ok else "0", window, min_calls, repr(ratio), ttl_ms]
        return _str(await self._record(keys=[key], args=args))


_MEMORY: dict[str, dict[str, str]] = {}
_MEMORY_LOCK = threading.Lock()


class _MemoryBackend:
    """The Lua scripts' twin over a process-local dict; keep the two in step. No expiry."""

    @staticmethod
    def _now_ms() -> int:
        return int(time.monotonic() * 1000)

    async def stop(self, key: str, code: str, message: str, run: str) -> tuple[bool, str, str]:
        with _MEMORY_LOCK:
            held = _MEMORY.get(key)
            if held:
                return False, held["code"], held["message"]
            at = f"{time.time():.3f}"
            _MEMORY[key] = {"code": code, "message": message, "at": at, "run": run}
            return True, code, message

    async def read(self, key: str) -> dict[str, str] | None:
        with _MEMORY_LOCK:
            return dict(_MEMORY[key]) if _MEMORY.get(key) else None

    async def delete(self, key: str) -> None:
        with _MEMORY_LOCK:
            _MEMORY.pop(key, None)

    async def circuit_check(
        self, key: str, cooldown_ms: int, probe_ms: int, ttl_ms: int
    ) -> tuple[int, int]:
        with _MEMORY_LOCK:
            h = _MEMORY.setdefault(key, {})
            state = h.get("state", "closed")
            if state == "closed":
                return 0, 0
            now = self._now_ms()
            if state == "open":
                ready_at = int(h.get("opened_ms", 0)) + cooldown_ms
            else:
                ready_at = int(h.get("probe_until_ms", 0))
            if now < ready_at:
                return 2, ready_at - now
            h.update(state="half_open", probe_until_ms=str(now + probe_ms))
            return 1, 0

    async def circuit_record(
        self, key: str, ok: bool, window: int, min_calls: int, ratio: float, ttl_ms: int
    ) -> str:
        with _MEMORY_LOCK:
            h = _MEMORY.setdefault(key, {})
            state = h.get("state", "closed")
            if state == "open":
                return "open"
            if state == "half_open":
                if ok:
                    h.update(state="closed", ring="")
                    h.pop("opened_ms", None)
                    h.pop("probe_until_ms", None)
                    return "closed"
                return self._open(h)
            ring = (h.get("ring", "") + ("1" if ok else "0"))[-window:]
            if len(ring) >= min_calls and ring.count("0") >= ratio * len(ring):
                return self._open(h)
            h.update(state="closed", ring=ring)
            return "closed"

    def _open(self, h: dict[str, str]) -> str:
        h.update(state="open", ring="", opened_ms=str(self._now_ms()))
        h.pop("probe_until_ms", None)
        h["opens"] = str(int(h.get("opens", 0)) + 1)
        return "opened"


def _backend(redis: Redis | None) -> _RedisBackend | _MemoryBackend:
    return _MemoryBackend() if redis is None else _RedisBackend(redis)


def _unreachable(exc: RedisError, doing: str) -> RedisUnavailable:
    return RedisUnavailable(f"Redis unreachable while {doing} ({type(exc).__name__}); not calling")


class FleetControl:
    """The stop flag of one account's fleet. ``cache_s``: how long a read is trusted, seconds."""

    def __init__(
        self, redis: Redis | None, keys: Keys, account: str, *, cache_s: float = 0.5
    ) -> None:
        self.key = keys.stop(account)
        self.cache_s = cache_s
        self._backend = _backend(redis)
        self._fresh_until = 0.0  # time.monotonic() until which _held is trusted
        self._held: tuple[str, str] | None = None

    @classmethod
    def from_settings(cls, redis: Redis | None, settings: Settings, **options: Any) -> FleetControl:
        """For the limit group of ``settings`` (``CARNUMBER_ACCOUNT``, else the AccessKeyId;
        raises ``ConfigError`` without either)."""
        account = account_tag(settings.limit_group())
        return cls(redis, Keys(settings.key_prefix), account, **options)

    def _remember(self, held: tuple[str, str] | None) -> None:
        self._held = held
        self._fresh_until = time.monotonic() + self.cache_s

    async def stop(self, code: str, message: str, run_id: str | None) -> None:
        """Stop every worker of the account. Idempotent: the first stop's code and message stay.

        This worker halts at once, even when Redis cannot be reached (then raises ``RedisUnavailable``).
        """
        message = safe_message(message)
        self._remember((code, message))
        try:
            won, held_code, held_message = await self._backend.stop(
                self.key, code, message, run_id or ""
            )
        except RedisError as exc:
            raise _unreachable(exc, "stopping the fleet") from None
        self._remember((held_code, held_message))
        if won:
            log.error("fleet stopped by %s (run %s): %s", code, run_id or "-", message)

    async def check(self) -> None:
        """Raise :class:`FleetStopped` while the flag is set; at most one read per ``cache_s``."""
        if time.monotonic() >= self._fresh_until:
            try:
                held = await self._backend.read(self.key)
            except RedisError as exc:
                raise _unreachable(exc, "reading the fleet stop flag") from None
            self._remember((held["code"], held.get("message", "")) if held else None)
        if self._held is not None:
            raise FleetStopped(*self._held)

    async def clear(self) -> None:
        """Lift the stop (an operator resumes). Other workers see it within ``cache_s``."""
        await self._backend.delete(self.key)
        self._remember(None)

    async def status(self) -> dict[str, Any] | None:
        """``{"code", "message", "at" (epoch seconds), "run" (or None)}``, or None when running."""
        held = await self._backend.read(self.key)
        if held is None:
            return None
        return {
            "code": held.get("code", ""),
            "message": held.get("message", ""),
            "at": float(held["at"]) if held.get("at") else None,
            "run": held.get("run") or None,
        }


class CircuitBreaker:
    """A fleet-wide circuit breaker over the outcomes of the last ``window`` calls.

    ``record(True)`` for an answer (results and bad-input refusals: the service is up),
    ``record(False)`` for a transient failure (5xx, timeouts, malformed bodies); see
    :func:`workers.retry.service_ok`. Times in seconds; ``probe_timeout_s`` (default
    ``cooldown_s``) is how long a probe may take before another is let through.
    """

    def __init__(
        self,
        redis: Redis | None,
        keys: Keys,
        account: str,
        *,
        window: int = 50,
        min_calls: int = 20,
        failure_ratio: float = 0.8,
        cooldown_s: float = 30.0,
        probe_timeout_s: float | None = None,
        cache_s: float = 0.5,
    ) -> None:
        if window < 1 or not 1 <= min_calls <= window:
            raise ValueError(
                f"need window >= 1 and 1 <= min_calls <= window: {window}, {min_calls}"
            )
        if not 0 < failure_ratio <= 1:
            raise ValueError(f"failure_ratio must be in (0, 1], got {failure_ratio}")
        if cooldown_s <= 0 or (probe_timeout_s is not None and probe_timeout_s <= 0):
            raise ValueError("cooldown_s and probe_timeout_s must be > 0")
        self.key = keys.circuit(account)
        self.window = window
        self.min_calls = min_calls
        self.failure_ratio = failure_ratio
        self.cooldown_ms = max(1, round(cooldown_s * 1000))
        self.probe_ms = max(1, round((probe_timeout_s or cooldown_s) * 1000))
        self.ttl_ms = round(max(_TTL_S, 10 * cooldown_s) * 1000)
        self.cache_s = cache_s
        self._backend = _backend(redis)
        self._fresh_until = 0.0
        self._open = False
        self._retry_in_s = 0.0

    @classmethod
    def from_settings(
        cls, redis: Redis | None, settings: Settings, **options: Any
    ) -> CircuitBreaker:
        """For the limit group of ``settings`` (``CARNUMBER_ACCOUNT``, else the AccessKeyId;
        raises ``ConfigError`` without either)."""
        account = account_tag(settings.limit_group())
        return cls(redis, Keys(settings.key_prefix), account, **options)

    def _remember(self, is_open: bool, for_s: float) -> None:
        self._open = is_open
        self._fresh_until = time.monotonic() + for_s

    async def check(self) -> None:
        """Raise :class:`CircuitOpen` while open; in half-open let exactly one call through."""
        if time.monotonic() >= self._fresh_until:
            try:
                verdict, wait_ms = await self._backend.circuit_check(
                    self.key, self.cooldown_ms, self.probe_ms, self.ttl_ms
                )
            except RedisError as exc:
                raise _unreachable(exc, "reading the circuit breaker") from None
            if verdict == 0:
                self._remember(False, self.cache_s)
                return
            if verdict == 1:
                # This call is the probe; the others of this process wait for its answer.
                self._retry_in_s = self.probe_ms / 1000
                self._remember(True, self.cache_s)
                return
            self._retry_in_s = wait_ms / 1000
            self._remember(True, min(self.cache_s, self._retry_in_s))
        if self._open:
            raise CircuitOpen(
                "circuit open: most recent calls failed; "
                f"a probe call may go in {self._retry_in_s:.1f} s"
            )

    async def record(self, ok: bool) -> None:
        """Count one call's outcome (True: the service answered). Best effort: a Redis error is
        logged, not raised, so that a result already in hand is never lost over a statistic."""
        try:
            state = await self._backend.circuit_record(
                self.key, ok, self.window, self.min_calls, self.failure_ratio, self.ttl_ms
            )
        except RedisError as exc:
            log.warning("circuit breaker: outcome not recorded (%s)", type(exc).__name__)
            return
        if state == "opened":
            log.warning("circuit breaker opened: most recent calls failed")
            self._retry_in_s = self.cooldown_ms / 1000
            self._remember(True, self.cache_s)
        elif state == "open":
            self._fresh_until = 0.0  # opened elsewhere: the next check reads how long it stays so
        else:
            self._remember(False, self.cache_s)

    async def reset(self) -> None:
        """Close the circuit and forget the outcomes (an operator's override)."""
        await self._backend.delete(self.key)
        self._remember(False, 0.0)

    async def status(self) -> dict[str, Any]:
        """``{"state": closed|open|half_open, "calls", "failures" (in the window), "opens"}``."""
        held = await self._backend.read(self.key) or {}
        ring = held.get("ring", "")
        return {
            "state": held.get("state", "closed"),
            "calls": len(ring),
            "failures": ring.count("0"),
            "opens": int(held.get("opens", 0)),
        }
