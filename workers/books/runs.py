"""Run bookkeeping in Redis: what was enqueued, which images have their outcome, what is parked,
what the operator asked for — and the run's state, derived from those facts.

Design note: ``ops/design/sink.md`` ("The run's books"). Each field has one writer:

* **the producer** (``carnumber enqueue``): the run's chunks (``run:chunks``, chunk id → digest:
  a chunk counts as enqueued once, when its id first enters), and each source's enqueue
  (``run:enqueues``: running with a heartbeat, complete, or incomplete with the command that
  finishes it);
* **the workers**: which images have their outcome (``workers/books/outcomes.py``: one bit per image,
  counted once), and the chunks they parked (``run:parked``, keyed by the remainder's part name,
  so parking the same remainder twice keeps one);
* **the operator** (``pause``/``cancel``/``resume``): the run's control (``run:control``,
  ``workers/books/control.py``), which no worker ever writes.

:attr:`RunSummary.state` is derived from them on every read: cancelled or paused (the operator),
else held by whatever parked its chunks (a fatal stop, the quota), else enqueuing, else done when
every enqueued image has its outcome and every source was enqueued to its end (incomplete when a
source's enqueue stopped early), else running. No command or worker sets a state, so none can
overwrite another's, and a replay cannot make a run look done.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from workers.keys import Keys
from workers.message import Chunk

__all__ = ["ENQUEUE_STALE_S", "REPAIRED", "STATES", "Enqueue", "RunStore", "RunSummary"]

STATES = (
    "enqueuing",
    "running",
    "paused",
    "cancelled",
    "stopped",
    "quota_exhausted",
    "circuit_open",
    "redis_unavailable",
    "shutdown",
    "incomplete",
    "done",
)

# A source's enqueue whose heartbeat is older than this is taken for dead (killed, host lost).
ENQUEUE_STALE_S = 60.0

# The digest of a chunk counted again by the repair (``workers/books/repair.py``): the producer's
# own digest is not recorded; a re-run of the producer takes the chunk as published.
REPAIRED = "repaired:"

# The chunk id prefix of a source in a run: "" for the run's first source, ARGV[2] for any other
# (kept, so enqueuing a source again gives its chunks the same ids).
# KEYS[1]=sources hash ARGV[1]=source ARGV[2]=the prefix it gets if it is not the first
_SOURCE_PREFIX = """
local p = redis.call('HGET', KEYS[1], ARGV[1])
if p then return p end
if redis.call('HLEN', KEYS[1]) == 0 then p = '' else p = ARGV[2] end
redis.call('HSET', KEYS[1], ARGV[1], p)
return p
"""

# A counter bump guarded by a hash field (chunk id -> digest of its source refs):
# KEYS[1]=chunks hash KEYS[2]=run hash ARGV[1]=chunk id ARGV[2]=digest ARGV[3..]=field,n
_SET_ONCE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
for i = 3, #ARGV, 2 do redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 1
"""


@dataclass(frozen=True, slots=True)
class Enqueue:
    """One source's enqueue into a run, as the producer last wrote it."""

    source: str
    state: str  # running | complete | incomplete
    published: int = 0  # images published so far
    reason: str = ""  # why it stopped early
    argv: tuple[str, ...] = ()  # the command that enqueues it (again: it skips what was published)
    at: float = 0.0  # heartbeat, Redis time (s)

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    def alive(self, now: float) -> bool:
        return self.state == "running" and now - self.at < ENQUEUE_STALE_S

    def unfinished(self, now: float) -> bool:
        """Stopped early, or its producer died: part of the source was never enqueued."""
        return self.state == "incomplete" or (self.state == "running" and not self.alive(now))


@dataclass(frozen=True, slots=True)
class RunSummary:
    run_id: str
    fields: dict[str, Any]
    control: str | None = None  # paused | cancelled: the operator's (workers/books/control.py)
    parked: int = 0  # images in parked chunks
    enqueues: tuple[Enqueue, ...] = ()
    now: float = field(default_factory=time.time)  # Redis's time when read

    @property
    def enqueued(self) -> int:
        return int(self.fields.get("images_enqueued", 0))

    @property
    def written(self) -> int:
        """Images with their outcome (each counted once: ``workers/books/outcomes.py``)."""
        return int(self.fields.get("images_written", 0))

    @property
    def outstanding(self) -> int:
        """Images enqueued and neither answered nor parked: in the queue or in flight."""
        return max(0, self.enqueued - self.written - self.parked)

    @property
    def unfinished_enqueues(self) -> list[Enqueue]:
        """Sources whose enqueue stopped early or died: their rest was never published."""
        return [e for e in self.enqueues if e.unfinished(self.now)]

    @property
    def state(self) -> str:
        if self.control in ("cancelled", "paused"):
            return self.control
        if self.parked > 0:
            return str(self.fields.get("held_by") or "paused")
        if any(e.alive(self.now) for e in self.enqueues) or (not self.enqueues and not self.enqueued):
            return "enqueuing"  # (or just created: nothing enqueued, no enqueue heard of yet)
        if self.written >= self.enqueued and (self.enqueued > 0 or self.enqueues):
            return "incomplete" if self.unfinished_enqueues else "done"
        return "running"

    @property
    def done(self) -> bool:
        return self.state == "done"


class RunStore:
    """Bookkeeping for runs over a synchronous ``redis.Redis``."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.r = client
        self.keys = keys
        self._set_once = client.register_script(_SET_ONCE)
        self._source_prefix = client.register_script(_SOURCE_PREFIX)

    # -- the producer's ------------------------------------------------------------------------
    def create(self, run_id: str, source: str) -> None:
        """Register the run (again); ``source`` stays the first one enqueued into it."""
        key = self.keys.run(run_id)
        now = time.time()
        pipe = self.r.pipeline()
        pipe.hsetnx(key, "created_at", now)
        pipe.hsetnx(key, "source", source)
        pipe.hset(key, mapping={"updated_at": now})
        pipe.zadd(self.keys.runs(), {run_id: now}, nx=True)
        for live in self.run_keys(run_id):  # a run enqueued into again is live again (retain())
            pipe.persist(live)
        pipe.execute()

    def source_prefix(self, run_id: str, source: str) -> str:
        """The chunk id prefix for ``source`` in the run: "" for its first source, ``s<digest>-``
        for each further one, the same every time that source is enqueued again."""
        other = "s" + hashlib.sha256(source.encode()).hexdigest()[:8] + "-"
        raw = self._source_prefix(keys=[self.keys.run_sources(run_id)], args=[source, other])
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def enqueued_digest(self, run_id: str, chunk_id: str) -> str | None:
        """The digest recorded when ``chunk_id`` was published (:data:`REPAIRED` and its size
        when the repair counted it again), or None if it never was."""
        raw = self.r.hget(self.keys.run_chunks(run_id), chunk_id)
        return raw.decode() if raw is not None else None

    def mark_enqueued(self, run_id: str, chunk_id: str, digest: str, images: int, skipped: int = 0) -> bool:
        """Count a published chunk once. Returns False if it was already counted."""
        return bool(
            self._set_once(
                keys=[self.keys.run_chunks(run_id), self.keys.run(run_id)],
                args=[
                    chunk_id,
                    digest,
                    "chunks_enqueued",
                    1,
                    "images_enqueued",
                    images,
                    "images_skipped",
                    skipped,
                ],
            )
        )

    def enqueue_progress(
        self, run_id: str, source: str, state: str, published: int, argv: list[str], reason: str = ""
    ) -> None:
        """The producer's word on one source: ``running`` (a heartbeat: call it at least every
        :data:`ENQUEUE_STALE_S` / 4), ``complete`` or ``incomplete`` (with ``reason``); ``argv``
        is the command that enqueues it again."""
        seconds, micros = self.r.time()
        at = seconds + micros / 1e6
        doc = {"state": state, "published": published, "at": at, "argv": argv, "reason": reason}
        self.r.hset(self.keys.run_enqueues(run_id), source, json.dumps(doc))

    # -- the workers' ---------------------------------------------------------------------------
    def park(self, chunk: Chunk, reason: str) -> None:
        """Set aside images that could not be called now; ``resume`` publishes them again.
        Parking the same remainder again keeps one (its part name is its key)."""
        name = chunk.part_name
        pipe = self.r.pipeline()
        pipe.hset(self.keys.run_parked(chunk.run_id), name, json.dumps(chunk.to_wire()))
        pipe.hset(self.keys.run_parked_images(chunk.run_id), name, len(chunk.images))
        pipe.hset(self.keys.run(chunk.run_id), mapping={"held_by": reason, "updated_at": time.time()})
        pipe.execute()

    def parked(self, run_id: str) -> list[tuple[str, Chunk]]:
        """Every parked remainder (its key, its chunk), left in place."""
        raw = self.r.hgetall(self.keys.run_parked(run_id))
        return [(k.decode(), Chunk.from_wire(json.loads(v))) for k, v in sorted(raw.items())]

    def unpark(self, run_id: str, name: str) -> None:
        """Forget one parked remainder: call it only once it is published again."""
        pipe = self.r.pipeline()
        pipe.hdel(self.keys.run_parked(run_id), name)
        pipe.hdel(self.keys.run_parked_images(run_id), name)
        pipe.execute()

    def drop_answered(self, run_id: str, chunk_id: str, answered: set[int]) -> int:
        """Forget parked remainders of ``chunk_id`` whose images all have their outcome now (the
        chunk ran again meanwhile: a redelivery): resuming them would do nothing, and they would
        keep the run looking held. Returns how many were dropped."""
        prefix = f"part-{chunk_id}-"
        gone = [
            name
            for name, chunk in self.parked(run_id)
            if name.startswith(prefix) and set(chunk.position_of()) <= answered
        ]
        for name in gone:
            self.unpark(run_id, name)
        return len(gone)

    def note_stop(self, run_id: str, code: str) -> None:
        """The fatal code that held the run (for status and verify; ``resume`` forgets it)."""
        self.r.hset(self.keys.run(run_id), mapping={"stop_code": code, "updated_at": time.time()})

    def clear_stop(self, run_id: str) -> None:
        """Forget the fatal code that stopped the run (the operator fixed it and resumed)."""
        self.r.hdel(self.keys.run(run_id), "stop_code")

    def touch(self, run_id: str, **fields: Any) -> None:
        """Set informational fields (``updated_at`` and the given ones): never a state."""
        self.r.hset(self.keys.run(run_id), mapping={"updated_at": time.time(), **fields})

    # -- reading ----------------------------------------------------------------------------------
    def get(self, run_id: str) -> RunSummary | None:
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self.keys.run(run_id))
        pipe.get(self.keys.run_control(run_id))
        pipe.hvals(self.keys.run_parked_images(run_id))
        pipe.hgetall(self.keys.run_enqueues(run_id))
        pipe.time()
        raw, control, parked, enqueues, (seconds, micros) = pipe.execute()
        if not raw:
            return None
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        return RunSummary(
            run_id,
            fields,
            control=control.decode() if control else None,
            parked=sum(int(n) for n in parked),
            enqueues=tuple(_enqueue(k.decode(), v) for k, v in sorted(enqueues.items())),
            now=seconds + micros / 1e6,
        )

    def runs(self, limit: int = 20) -> list[str]:
        return [r.decode() for r in self.r.zrevrange(self.keys.runs(), 0, limit - 1)]

    # -- retention --------------------------------------------------------------------------------
    def run_keys(self, run_id: str) -> list[str]:
        k = self.keys
        return [
            k.run(run_id), k.run_chunks(run_id), k.run_sources(run_id), k.run_done(run_id),
            k.run_parked(run_id), k.run_parked_images(run_id), k.run_outcomes(run_id),
            k.run_enqueues(run_id), k.run_control(run_id), k.run_events(run_id), k.run_answers(run_id),
            k.run_repaired(run_id),
        ]  # fmt: skip

    def retain(self, run_id: str, seconds: float) -> None:
        """Let every key of a finished run expire ``seconds`` from now (``CARNUMBER_RUN_RETENTION_S``);
        ``create`` (a further enqueue) makes the run hash live again."""
        pipe = self.r.pipeline()
        for key in self.run_keys(run_id):
            pipe.expire(key, max(1, int(seconds)))
        pipe.execute()

    def settle(self, run_id: str, retention_s: float) -> bool:
        """When the run is done: drop its answer journal (every answer is in the output; a late
        message finds its images answered and calls nothing) and let its keys expire after
        ``retention_s``. Returns whether it is done."""
        summary = self.get(run_id)
        if summary is None or not summary.done:
            return False
        self.r.delete(self.keys.run_answers(run_id))
        self.retain(run_id, retention_s)
        return True

    def prune(self) -> int:
        """Drop from the list of runs those whose keys have expired; returns how many."""
        gone = [r for r in self.runs(limit=10_000) if not self.r.exists(self.keys.run(r))]
        if gone:
            self.r.zrem(self.keys.runs(), *gone)
        return len(gone)


def _enqueue(source: str, raw: bytes) -> Enqueue:
    doc = json.loads(raw)
    return Enqueue(
        source,
        str(doc.get("state", "running")),
        int(doc.get("published", 0)),
        str(doc.get("reason", "")),
        tuple(str(a) for a in doc.get("argv", ())),
        float(doc.get("at", 0.0)),
    )
