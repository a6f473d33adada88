"""The answer journal: every paid answer is durable in Redis the moment it arrives, keyed by
the picture it answers, and every copy of that picture in the run reuses it.

Design note: ``ops/design/sink.md`` ("No second payment"). In short:

* **Keyed by the picture.** A journal entry's field is the image's content key
  (``workers/content.py``: SHA-256 of the bytes, or an object's ETag and size), or ``id:<image
  id>`` when no content key is known. Byte-identical images anywhere in a run share one entry.
* **Look up before every paid call.** A chunk first reads the answers already journalled for its
  pictures (one ``HMGET``) and writes those without calling; only the rest are called.
* **Claim, then call.** Right before an image's call is admitted, :meth:`AnswerJournal.claim`
  either returns its picture's answer (another image got it meanwhile), grants this caller a
  short claim (``claim_ms``, renewed on every attempt), or says another caller holds it: then
  this one waits and asks again. So copies of one picture racing on many workers make one call,
  and two holders of one chunk (a lease that ran out under a paused process, a partition that
  healed) never pay twice; a dead holder's claim simply runs out.
* **Write on every answer.** A recognition, or a terminal error the service gave for the picture
  (billed, and it will not change within the run: a bad-input code, an answer still unreadable
  after its one retry), goes into the run's answers hash with the claim released in the same
  script. Other retryable errors are not answers: they are tried again.
* **Kept for the run.** The hash lives while the run does: one compact answer per distinct
  picture (a few hundred bytes). It is deleted when the run is done (``RunStore.settle``);
  it also expires ``ttl_s`` after its last write.

Bound: a crash costs at most the calls in flight at that instant (sent, answer not yet back).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from workers.api.response import Recognition
from workers.books.spill import SpilledAnswer
from workers.errors import RedisUnavailable
from workers.keys import Keys

if TYPE_CHECKING:
    import redis
    from redis.asyncio import Redis

__all__ = ["Answer", "AnswerJournal", "Held", "MemoryJournal", "Written", "replay_into"]

log = logging.getLogger(__name__)
_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class Answer:
    """One paid answer: a recognition, or the service's terminal error for this image."""

    attempts: int
    recognition: Recognition | None = None
    error: dict[str, Any] | None = None  # code, message, retryable, status, request_id
    by: str = ""  # the image id whose call produced it (copies of the picture reuse it)

    def to_json(self) -> str:
        doc: dict[str, Any] = {"a": self.attempts, "by": self.by}
        if self.recognition is not None:
            doc["rec"] = self.recognition.to_json()
        else:
            doc["err"] = self.error
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Answer:
        doc = json.loads(text)
        rec = doc.get("rec")
        return cls(
            attempts=int(doc["a"]),
            recognition=Recognition.from_json(rec) if rec is not None else None,
            error=doc.get("err"),
            by=str(doc.get("by", "")),
        )


@dataclass(frozen=True, slots=True)
class Written:
    """The image has its outcome in the output already (another holder of its chunk wrote it):
    call and write nothing for it."""


@dataclass(frozen=True, slots=True)
class Held:
    """Another caller is calling for this image; ask again in ``retry_s`` at the latest."""

    retry_s: float


def _unreachable(exc: RedisError, doing: str) -> RedisUnavailable:
    return RedisUnavailable(f"Redis unreachable while {doing} ({type(exc).__name__}); not calling")


class AnswerJournal:
    """The journal over ``redis.asyncio``. ``ttl_s``: lifetime of a run's answers after their last
    write; ``claim_ms``: how long a claim lasts unless renewed (longer than one attempt)."""

    def __init__(self, client: Redis, keys: Keys, *, ttl_s: int, claim_ms: int = 60_000) -> None:
        self.client = client
        self.keys = keys
        self.ttl_s = ttl_s
        self.claim_ms = claim_ms
        self._claim = client.register_script((_HERE / "journal_claim.lua").read_text())
        self._record = client.register_script((_HERE / "journal_record.lua").read_text())
        self._release = client.register_script((_HERE / "journal_release.lua").read_text())

    async def answers(self, run_id: str, pictures: Sequence[str]) -> dict[str, Answer]:
        """The journalled answers among ``pictures``. Raises :class:`RedisUnavailable`."""
        if not pictures:
            return {}
        try:
            raw = await self.client.hmget(self.keys.run_answers(run_id), list(pictures))
        except RedisError as exc:
            raise _unreachable(exc, "reading the answer journal") from None
        return {i: Answer.from_json(v) for i, v in zip(pictures, raw, strict=True) if v is not None}

    async def claim(
        self, run_id: str, picture: str, token: str, where: tuple[str, int] | None = None
    ) -> Answer | Held | Written | None:
        """``None``: the caller may call now. ``where``: the image's chunk id and position (then
        :class:`Written` when it has its outcome already). Raises :class:`RedisUnavailable`."""
        chunk_id, position = where if where is not None else ("", 0)
        try:
            reply = await self._claim(
                keys=[
                    self.keys.run_answers(run_id),
                    self.keys.claim(run_id, picture),
                    self.keys.run_outcomes(run_id),
                ],
                args=[picture, token, self.claim_ms, chunk_id, position],
            )
        except RedisError as exc:
            raise _unreachable(exc, "claiming an image") from None
        kind = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
        if kind == "written":
            return Written()
        if kind == "answer":
            return Answer.from_json(reply[1])
        if kind == "held":
            left_ms = int(reply[1])
            return Held(min(1.0, max(0.05, left_ms / 1000)))
        return None

    async def record(self, run_id: str, picture: str, answer: Answer, token: str) -> bool:
        """Journal ``answer`` and release the claim. Retries for a few seconds; returns False
        (logged) if Redis stays unreachable: the answer still reaches the part, but a crash
        before then would pay for it again."""
        delay_s = 0.05
        deadline = time.monotonic() + 5.0
        while True:
            try:
                await self._record(
                    keys=[self.keys.run_answers(run_id), self.keys.claim(run_id, picture)],
                    args=[picture, answer.to_json(), self.ttl_s, token],
                )
                return True
            except RedisError as exc:
                if time.monotonic() + delay_s > deadline:
                    log.warning("image %s: answer not journalled (%s)", picture, type(exc).__name__)
                    return False
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 1.0)

    async def release(self, run_id: str, picture: str, token: str) -> None:
        """Give up a claim without an answer; best effort (an unreleased claim runs out)."""
        with contextlib.suppress(RedisError):
            await self._release(keys=[self.keys.claim(run_id, picture)], args=[token])


class MemoryJournal:
    """The same claims and answers in one process's memory, for tests without Redis (it knows no
    outcomes: ``where`` is ignored)."""

    def __init__(self, claim_s: float = 60.0) -> None:
        self.claim_s = claim_s
        self.entries: dict[tuple[str, str], Answer] = {}
        self.claims: dict[tuple[str, str], tuple[str, float]] = {}

    async def answers(self, run_id: str, pictures: Sequence[str]) -> dict[str, Answer]:
        return {i: self.entries[(run_id, i)] for i in pictures if (run_id, i) in self.entries}

    async def claim(
        self, run_id: str, picture: str, token: str, where: tuple[str, int] | None = None
    ) -> Answer | Held | Written | None:
        slot = (run_id, picture)
        if slot in self.entries:
            return self.entries[slot]
        now = time.monotonic()
        holder = self.claims.get(slot)
        if holder is not None and holder[0] != token and holder[1] > now:
            return Held(min(1.0, holder[1] - now))
        self.claims[slot] = (token, now + self.claim_s)
        return None

    async def record(self, run_id: str, picture: str, answer: Answer, token: str) -> bool:
        self.entries.setdefault((run_id, picture), answer)
        if self.claims.get((run_id, picture), ("",))[0] == token:
            del self.claims[(run_id, picture)]
        return True

    async def release(self, run_id: str, picture: str, token: str) -> None:
        if self.claims.get((run_id, picture), ("",))[0] == token:
            del self.claims[(run_id, picture)]


def replay_into(client: redis.Redis, keys: Keys, ttl_s: int) -> Callable[[SpilledAnswer], None]:
    """A sync writer of spilled answers (``workers/books/spill.py``) into the journal: the first answer
    of a picture stays, as :meth:`AnswerJournal.record` keeps it. Raises ``RedisError``."""

    def put(item: SpilledAnswer) -> None:
        key = keys.run_answers(item.run_id)
        pipe = client.pipeline()
        pipe.hsetnx(key, item.picture, item.answer)
        pipe.expire(key, ttl_s)
        pipe.execute()

    return put
