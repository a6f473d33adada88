"""Paid answers that could not reach the journal wait on local disk until Redis comes back.

Design note: ``ops/design/sink.md`` ("No second payment"). The journal write of an answer is
retried for a few seconds; when Redis stays away longer (a restart past
``CARNUMBER_REDIS_OUTAGE_S``, a cut), the chunk is retried later and its answers would be paid for
again. So an answer the journal refused is appended to this process's spill file
(``{CARNUMBER_SPILL_DIR}/{host}-{pid}.jsonl``: one JSON line per answer, flushed at once), and
:meth:`AnswerSpill.replay` puts every spilled answer of the host's spill files into the journal
once Redis answers again (the engine tries it every second while anything is spilled, and before
each chunk), keeping the first answer as the journal does, then removes what it replayed. A
killed process's file is replayed by the next process on the host. What a spill cannot save:
answers of a node whose disk is lost with it (the bound of the journal: the calls of that window).

This module imports nothing of ours.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AnswerSpill", "SpilledAnswer", "default_spill_dir"]

log = logging.getLogger(__name__)


def default_spill_dir() -> Path:
    """``$XDG_CACHE_HOME/carnumber/spill``, else ``~/.cache/carnumber/spill``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "carnumber" / "spill"


@dataclass(frozen=True, slots=True)
class SpilledAnswer:
    run_id: str
    picture: str
    answer: str  # the journal's encoding (``Answer.to_json``)


class AnswerSpill:
    """The spill files of one host in ``directory``; this process appends to its own."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / f"{socket.gethostname()}-{os.getpid()}.jsonl"
        self._lock = threading.Lock()
        self._spilled = 0  # appended by this process and not replayed yet

    def append(self, item: SpilledAnswer) -> None:
        """Keep one answer; raises ``OSError`` when the disk refuses (the caller logs it)."""
        line = json.dumps({"run": item.run_id, "picture": item.picture, "answer": item.answer})
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)  # a replay by another process waits for this line
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self._spilled += 1

    def pending(self) -> bool:
        """Whether anything may wait to be replayed (this process's own, or a dead one's)."""
        return self._spilled > 0 or any(p.stat().st_size > 0 for p in self._files())

    def replay(self, put: Callable[[SpilledAnswer], None]) -> int:
        """Hand every spilled answer of the host to ``put`` (the journal write; it raises while
        Redis is away, and then nothing is removed), then empty the files replayed. Each file is
        locked meanwhile, so an answer appended by another process is never lost. Returns how
        many answers were replayed."""
        replayed = 0
        with self._lock:
            for path in list(self._files()):
                with path.open("r+", encoding="utf-8") as fh:
                    fcntl.flock(fh, fcntl.LOCK_EX)
                    items = list(_parse(fh.read(), path))
                    for item in items:
                        put(item)
                    fh.truncate(0)
                replayed += len(items)
                if _dead(path):
                    path.unlink(missing_ok=True)  # nobody will append to it again
            self._spilled = 0
        if replayed:
            log.warning("replayed %d spilled answer(s) into the journal", replayed)
        return replayed

    def _files(self) -> Iterator[Path]:
        """This host's spill files (another host's, on a shared volume, are its own to replay)."""
        if self.directory.is_dir():
            yield from sorted(self.directory.glob(f"{socket.gethostname()}-*.jsonl"))


def _dead(path: Path) -> bool:
    """Whether the spill file belongs to a process of this host that is gone."""
    pid = path.stem.rpartition("-")[2]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _parse(text: str, path: Path) -> Iterator[SpilledAnswer]:
    for line in text.splitlines():
        try:
            doc = json.loads(line)
            yield SpilledAnswer(str(doc["run"]), str(doc["picture"]), str(doc["answer"]))
        except (ValueError, KeyError, TypeError):
            log.warning("spill %s: a line that does not parse was skipped (a write cut short)", path)
