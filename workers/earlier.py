"""Answers paid for in earlier runs, as the pipeline asks for them before it calls.

The answer cache (``workers/answer_cache.py``, under the output) is filled by the producer from
the output's rows (``producers/answer_index.py``), each entry a journal :class:`Answer` with 0
attempts (a copy answered from it makes no call); here a worker looks a chunk's pictures up in
it, one batch per chunk, on a thread. A run enqueued with ``--reprocess`` says so in its run hash
(``reuse_answers = 0``) and is never answered from the cache. Each enqueue of the run stamps
``answers_updated_at`` after it has updated the cache; a worker that sees a new stamp reads the
cache's manifest again before its next lookup (a further source enqueued into a running run
finds the answers written meanwhile). A copy answered this way gets its
own rows with 0 attempts and ``answered_by`` naming the image, in the earlier run, whose call
answered it.

The cache lives on the output store: if it cannot be read (after a few tries), or an entry is
damaged, the chunk goes on without it and calls; those pictures are then paid again, and that
is logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from workers.books.journal import Answer
from workers.errors import RedisUnavailable
from workers.keys import Keys

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from workers.answer_cache import AnswerCache

__all__ = ["REUSE_FIELD", "UPDATED_FIELD", "EarlierAnswers"]

log = logging.getLogger(__name__)
REUSE_FIELD = "reuse_answers"  # run hash field: "0" for a run that must call for every picture
UPDATED_FIELD = "answers_updated_at"  # run hash field: when its producer last updated the cache
_TRIES = 3


class EarlierAnswers:
    """The cache across runs, for the runs that may use it."""

    def __init__(self, cache: AnswerCache, client: Redis, keys: Keys) -> None:
        self.cache = cache
        self.client = client
        self.keys = keys
        self._seen: dict[str, bytes | str] = {}  # run id -> the cache update this process saw

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
            except (OSError, ValueError) as exc:  # the store, or a damaged segment (ArrowInvalid)
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
        answers: dict[str, Answer] = {}
        for picture, data in found.items():
            try:
                answers[picture] = Answer.from_json(data)
            except (ValueError, KeyError, TypeError):  # a damaged entry: call for it instead
                log.warning("run %s: answer cache entry for %s unreadable; calling", run_id, picture)
        return answers

    async def _allowed(self, run_id: str) -> bool:
        """Whether the run may use the cache; reads the cache's manifest again when the run's
        producer has updated the cache since this process last looked (one round trip)."""
        try:
            reuse, updated = await self.client.hmget(self.keys.run(run_id), [REUSE_FIELD, UPDATED_FIELD])
        except RedisError as exc:
            raise RedisUnavailable(f"Redis unreachable reading run {run_id} ({type(exc).__name__})") from None
        if updated is not None and self._seen.get(run_id) != updated:
            self.cache.refresh()
            if len(self._seen) > 1000:
                self._seen.clear()
            self._seen[run_id] = updated
        return reuse not in (b"0", "0")

    def close(self) -> None:
        self.cache.close()
