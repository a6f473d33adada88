"""Run bookkeeping in Redis: what was enqueued, what was written, what is parked, and the state.

A run's hash holds counters that are each bumped exactly once per event, guarded by set
membership: a chunk counts as enqueued when its id first enters ``run:chunks``; a part counts as
written when its name first enters ``run:done``. Redelivered chunks therefore never inflate the
numbers. Progress = written / enqueued; ``parked`` chunks wait for ``carnumber resume``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from workers.keys import Keys
from workers.message import Chunk

__all__ = ["RunStore", "RunSummary"]

STATES = (
    "enqueuing",
    "running",
    "paused",
    "cancelled",
    "stopped",
    "quota_exhausted",
    "circuit_open",
    "redis_unavailable",
    "done",
)

# Counter bump guarded by set membership: KEYS[1]=set KEYS[2]=hash ARGV[1]=member ARGV[2..]=field,n
_ADD_ONCE = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 1
"""

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

# The same, guarded by a hash field (chunk id -> digest of its source refs):
# KEYS[1]=chunks hash KEYS[2]=run hash ARGV[1]=chunk id ARGV[2]=digest ARGV[3..]=field,n
_SET_ONCE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
for i = 3, #ARGV, 2 do redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 1
"""


@dataclass(frozen=True, slots=True)
class RunSummary:
    run_id: str
    state: str
    fields: dict[str, Any]

    @property
    def enqueued(self) -> int:
        return int(self.fields.get("images_enqueued", 0))

    @property
    def written(self) -> int:
        return int(self.fields.get("images_written", 0))

    @property
    def parked(self) -> int:
        return int(self.fields.get("images_parked", 0))

    @property
    def outstanding(self) -> int:
        """Images enqueued and neither written nor parked: in the queue or in flight."""
        return max(0, self.enqueued - self.written - self.parked)


class RunStore:
    """Bookkeeping for runs over a synchronous ``redis.Redis``."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.r = client
        self.keys = keys
        self._add_once = client.register_script(_ADD_ONCE)
        self._set_once = client.register_script(_SET_ONCE)
        self._source_prefix = client.register_script(_SOURCE_PREFIX)

    def create(self, run_id: str, source: str) -> None:
        """Register the run (again); ``source`` stays the first one enqueued into it."""
        key = self.keys.run(run_id)
        now = time.time()
        pipe = self.r.pipeline()
        pipe.hsetnx(key, "created_at", now)
        pipe.hsetnx(key, "state", "enqueuing")
        pipe.hsetnx(key, "source", source)
        pipe.hset(key, mapping={"updated_at": now})
        pipe.zadd(self.keys.runs(), {run_id: now}, nx=True)
        pipe.execute()

    def source_prefix(self, run_id: str, source: str) -> str:
        """The chunk id prefix for ``source`` in the run: "" for its first source, ``s<digest>-``
        for each further one, the same every time that source is enqueued again."""
        other = "s" + hashlib.sha256(source.encode()).hexdigest()[:8] + "-"
        raw = self._source_prefix(keys=[self.keys.run_sources(run_id)], args=[source, other])
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def enqueued_digest(self, run_id: str, chunk_id: str) -> str | None:
        """The digest recorded when ``chunk_id`` was published, or None if it never was."""
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

    def mark_written(
        self, run_id: str, part_name: str, images: int, failed: int, plates: int, calls: int
    ) -> bool:
        """Count a written part once (a redelivered chunk rewrites the same part name)."""
        return bool(
            self._add_once(
                keys=[self.keys.run_done(run_id), self.keys.run(run_id)],
                args=[
                    part_name,
                    "images_written",
                    images,
                    "images_failed",
                    failed,
                    "plates",
                    plates,
                    "calls",
                    calls,
                ],
            )
        )

    def is_written(self, run_id: str, part_name: str) -> bool:
        """Whether ``part_name`` was written and counted for the run."""
        return bool(self.r.sismember(self.keys.run_done(run_id), part_name))

    def park(self, chunk: Chunk, reason: str) -> None:
        """Set aside images the fleet could not call now; ``resume`` publishes them again."""
        pipe = self.r.pipeline()
        pipe.rpush(self.keys.run_parked(chunk.run_id), json.dumps(chunk.to_wire()))
        pipe.hincrby(self.keys.run(chunk.run_id), "images_parked", len(chunk.images))
        pipe.hset(self.keys.run(chunk.run_id), mapping={"state": reason, "updated_at": time.time()})
        pipe.execute()

    def unpark(self, run_id: str) -> list[Chunk]:
        """Take every parked chunk (atomically) and reset the parked counter."""
        key = self.keys.run_parked(run_id)
        pipe = self.r.pipeline()
        pipe.lrange(key, 0, -1)
        pipe.delete(key)
        raw, _ = pipe.execute()
        chunks = [Chunk.from_wire(json.loads(item)) for item in raw]
        if chunks:
            self.r.hincrby(self.keys.run(run_id), "images_parked", -sum(len(c.images) for c in chunks))
        return chunks

    def set_state(self, run_id: str, state: str, **extra: Any) -> None:
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}")
        self.r.hset(self.keys.run(run_id), mapping={"state": state, "updated_at": time.time(), **extra})

    def clear_stop(self, run_id: str) -> None:
        """Forget the fatal code that stopped the run (the operator fixed it and resumed)."""
        self.r.hdel(self.keys.run(run_id), "stop_code")

    def get(self, run_id: str) -> RunSummary | None:
        raw = self.r.hgetall(self.keys.run(run_id))
        if not raw:
            return None
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        return RunSummary(run_id, fields.get("state", "unknown"), fields)

    def runs(self, limit: int = 20) -> list[str]:
        return [r.decode() for r in self.r.zrevrange(self.keys.runs(), 0, limit - 1)]
