"""Answers paid for in earlier runs, as the pipeline asks for them before it calls.

The answer cache (``workers/answer_cache.py``, under the output) is filled by the producer from
the output's rows (``producers/answer_index.py``); here a worker looks a chunk's pictures up in
it, one batch per chunk, on a thread. A run enqueued with ``--reprocess`` says so in its run hash
(``reuse_answers = 0``) and is never answered from the cache. A copy answered this way gets its
own rows with 0 attempts and ``answered_by`` naming the image, in the earlier run, whose call
answered it.

The cache lives on the output store: if it cannot be read (after a few tries) the chunk goes on
without it and calls; those pictures are then paid again, and that is logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from workers.api.response import Recognition
from workers.errors import RedisUnavailable
from workers.journal import Answer
from workers.keys import Keys

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from workers.answer_cache import AnswerCache

__all__ = ["REUSE_FIELD", "EarlierAnswers", "payload", "read_payload"]

log = logging.getLogger(__name__)
REUSE_FIELD = "reuse_answers"  # run hash field: "0" for a run that must call for every picture
_TRIES = 3
_SETTING_TTL_S = 60.0  # how long a run's reuse setting is trusted before it is read again


def payload(recognition: Recognition, by: str, run_id: str) -> bytes:
    """What the cache keeps for one picture: the recognition, the image whose call gave it, and
    that call's run."""
    doc = {"by": by, "run": run_id, "rec": recognition.to_json()}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def read_payload(data: bytes) -> tuple[Answer, str]:
    """The answer (0 attempts: nothing is called for the copy) and the run that paid for it."""
    doc: dict[str, Any] = json.loads(data)
    return Answer(0, recognition=Recognition.from_json(doc["rec"]), by=str(doc["by"])), str(doc["run"])


class EarlierAnswers:
    """The cache across runs, for the runs that may use it."""

    def __init__(self, cache: AnswerCache, client: Redis, keys: Keys) -> None:
        self.cache = cache
        self.client = client
        self.keys = keys
        self._reuse: dict[str, tuple[bool, float]] = {}

    async def lookup(self, run_id: str, pictures: Sequence[str]) -> dict[str, Answer]:
        """Answers for those of ``pictures`` (content keys) answered in an earlier run. Raises
        :class:`RedisUnavailable` when the run's setting cannot be read."""
        if not pictures or not await self._allowed(run_id):
            return {}
        delay_s = 0.2
        for attempt in range(_TRIES):
            try:
                found = await asyncio.to_thread(self.cache.lookup, list(pictures))
                break
            except OSError as exc:
                if attempt == _TRIES - 1:
                    log.warning(
                        "run %s: answer cache unreadable (%s: %s); calling for %d picture(s)",
                        run_id,
                        type(exc).__name__,
                        exc,
                        len(pictures),
                    )
                    return {}
                await asyncio.sleep(delay_s)
                delay_s *= 4
        return {picture: read_payload(data)[0] for picture, data in found.items()}

    async def _allowed(self, run_id: str) -> bool:
        known = self._reuse.get(run_id)
        now = time.monotonic()
        if known is not None and now - known[1] < _SETTING_TTL_S:
            return known[0]
        if known is None:
            self.cache.refresh()  # a run new to this process: its producer updated the cache
        try:
            raw = await self.client.hget(self.keys.run(run_id), REUSE_FIELD)
        except RedisError as exc:
            raise RedisUnavailable(f"Redis unreachable reading run {run_id} ({type(exc).__name__})") from None
        allowed = raw not in (b"0", "0")
        if len(self._reuse) > 1000:
            self._reuse.clear()
        self._reuse[run_id] = (allowed, now)
        return allowed

    def close(self) -> None:
        self.cache.close()
