"""A set of byte strings on disk, for sources and plans that must remember millions of keys.

SQLite in a temporary directory: memory stays flat however many keys (the page cache is capped at
16 MB). Used by ``carnumber plan`` for content keys and by sources for image ids already listed
(a manifest naming one image twice, an archive holding one name twice). Not thread-safe.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile

__all__ = ["DigestSet"]


class DigestSet:
    """A set of byte strings on disk (SQLite in a temporary directory): memory stays flat for
    millions of keys. :meth:`add` is True the first time a key is seen. Not thread-safe."""

    def __init__(self, directory: str | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="carnumber-seen-", dir=directory)
        self._db = sqlite3.connect(os.path.join(self._dir.name, "keys.sqlite"))
        self._db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16000;"
            "CREATE TABLE seen (k BLOB PRIMARY KEY) WITHOUT ROWID;"
        )
        self._pending = 0

    def add(self, key: bytes) -> bool:
        cur = self._db.execute("INSERT OR IGNORE INTO seen (k) VALUES (?)", (key,))
        self._pending += 1
        if self._pending >= 10_000:
            self._db.commit()
            self._pending = 0
        return cur.rowcount == 1

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()

    def __enter__(self) -> DigestSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
