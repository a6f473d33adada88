"""Which images of a run have their outcome: facts that cannot be counted twice.

Design note: ``ops/design/sink.md`` ("The run's books"). A run's progress was counters bumped per
part written (enqueued − written − parked); a chunk written in two pieces and then redelivered
whole counted its images twice, the run looked done early, its journal was dropped and later
chunks paid again. Here every image is known by ``(chunk id, position)`` — its place in the chunk
as first published, kept by every remainder of it (:class:`~workers.message.Chunk` ``positions``)
— and the run keeps one bitmap per chunk (``{p}:run:{id}:outcomes``, a hash chunk id → bitmap;
one bit per image, 25 bytes for a chunk of 200):

* :meth:`OutcomeBook.mark` sets the bits of the images whose rows were written, in the same script
  that counts them (``images_written``, ``images_failed``, ``plates``): only images new to the
  bitmap count, however often or in whatever pieces a chunk runs;
* :meth:`OutcomeBook.answered` tells a worker which images of a chunk need nothing more (a
  redelivery, a parked remainder resumed after another holder finished it): they are neither
  called nor written again, so a run marked done can drop its journal safely;
* :meth:`OutcomeBook.clear` forgets images whose rows are gone from the output (``verify
  --republish``), so they are answered again.

So "done" is ``images_written == images_enqueued`` (each counted once, by set membership) with
every source fully enqueued: a fact, not a balance of counters. Sync, over ``redis.Redis``; this
module imports nothing of ours but :mod:`workers.keys`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from workers.keys import Keys

if TYPE_CHECKING:
    import redis

__all__ = ["Outcome", "OutcomeBook", "positions_in"]

_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class Outcome:
    """One image's outcome, as the books count it."""

    position: int
    failed: bool = False
    plates: int = 0


def positions_in(bitmap: bytes | None) -> set[int]:
    """The positions whose bit is set (bit ``p`` is bit ``p % 8`` of byte ``p // 8``)."""
    if not bitmap:
        return set()
    return {i * 8 + b for i, byte in enumerate(bitmap) if byte for b in range(8) if byte >> b & 1}


class OutcomeBook:
    """The outcome bitmaps of runs, over a synchronous ``redis.Redis``."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.r = client
        self.keys = keys
        self._mark = client.register_script((_HERE / "outcomes_mark.lua").read_text())
        self._clear = client.register_script((_HERE / "outcomes_clear.lua").read_text())

    def mark(self, run_id: str, chunk_id: str, outcomes: Iterable[Outcome], part: str = "") -> int:
        """Set the bits of ``outcomes`` (and record ``part`` as written); returns how many images
        were new to the books. Raises ``RedisError``."""
        args: list[object] = [chunk_id, part]
        for o in outcomes:
            args.extend((o.position, int(o.failed), o.plates))
        keys = [self.keys.run_outcomes(run_id), self.keys.run(run_id), self.keys.run_done(run_id)]
        return int(self._mark(keys=keys, args=args))

    def answered(self, run_id: str, chunk_id: str) -> set[int]:
        """Positions of ``chunk_id`` whose images have their outcome. Raises ``RedisError``."""
        raw = self.r.hget(self.keys.run_outcomes(run_id), chunk_id)
        return positions_in(raw if isinstance(raw, bytes) else None)

    def all_answered(self, run_id: str) -> dict[str, set[int]]:
        """Chunk id → answered positions, for every chunk of the run. Raises ``RedisError``."""
        raw = self.r.hgetall(self.keys.run_outcomes(run_id))
        return {k.decode(): positions_in(v) for k, v in raw.items()}

    def clear(self, run_id: str, chunk_id: str, positions: Sequence[int]) -> int:
        """Forget the outcomes at ``positions``; returns how many were set. Raises ``RedisError``."""
        if not positions:
            return 0
        keys = [self.keys.run_outcomes(run_id), self.keys.run(run_id)]
        return int(self._clear(keys=keys, args=[chunk_id, *positions]))
