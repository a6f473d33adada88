"""Which listed images a source keeps: name pattern, time window, and where paths may point.

Pure functions over names, datetimes and paths (the containment check resolves symlinks, the
only I/O here).

* **Name**: with no ``glob``, files with an image extension (``.jpg .jpeg .png .bmp .gif .tif
  .tiff .webp``, any case). With a ``glob``, only names matching it, case-insensitively
  (cameras write ``.JPG``); a pattern with a ``/`` is matched against the path relative to the
  source (folder, archive or prefix), otherwise against the file name.
* **Time** (``since`` inclusive, ``until`` exclusive): the date in the path when there is one
  (``2026-11-23``, ``2026_11_23``, ``20261123``, ``2026/11/23``, optionally followed by a time
  ``T12:30:00``/``123000``; the last one in the path wins), else the file's mtime (object
  stores: LastModified; archives: the member's mtime). A date with no time covers its whole
  day: the image is kept when that day overlaps the window. Dates in paths are wall-clock
  times, compared with ``since``/``until`` as written; a naive ``since``/``until`` compared with
  an mtime is taken as local time (as ``find -newermt`` does).
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from workers.errors import InputError

__all__ = ["IMAGE_EXTENSIONS", "Filter", "date_in_path", "inside"]

IMAGE_EXTENSIONS = frozenset((".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"))

_DATE = re.compile(
    r"(?<!\d)((?:19|20)\d\d)([-_/.]?)(0[1-9]|1[0-2])\2(0[1-9]|[12]\d|3[01])"
    r"(?:[T _-]?([01]\d|2[0-3])[:\-_.]?([0-5]\d)[:\-_.]?([0-5]\d))?(?!\d)"
)


def date_in_path(text: str) -> tuple[datetime, datetime] | None:
    """The (start, end) wall-clock interval named by the last date in ``text``: a whole day, or
    one second when a time follows the date. None when there is no (valid) date."""
    found = None
    for m in _DATE.finditer(text):
        found = m
    if found is None:
        return None
    y, _, mo, d, hh, mm, ss = found.groups()
    try:
        if hh is None:
            start = datetime(int(y), int(mo), int(d))
            return start, start + timedelta(days=1)
        start = datetime(int(y), int(mo), int(d), int(hh), int(mm), int(ss))
    except ValueError:  # 2026-02-30
        return None
    return start, start + timedelta(seconds=1)


def _naive_wall(t: datetime) -> datetime:
    return t.astimezone().replace(tzinfo=None) if t.tzinfo else t


def _aware(t: datetime) -> datetime:
    return t.astimezone() if t.tzinfo is None else t  # naive = local time


def inside(root: str, path: str) -> bool:
    """True when ``path`` (symlinks resolved) is ``root`` or below it."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


@dataclass(frozen=True, slots=True)
class Filter:
    """A source's name and time filter; ``Filter()`` keeps every image file."""

    glob: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        if self.since is not None and self.until is not None and _aware(self.since) >= _aware(self.until):
            raise InputError(f"--since {self.since} must be before --until {self.until}")

    @property
    def has_time(self) -> bool:
        return self.since is not None or self.until is not None

    def name_ok(self, relative: str) -> bool:
        """``relative`` is the path inside the source (``/``-separated)."""
        if self.glob is None:
            return os.path.splitext(relative)[1].lower() in IMAGE_EXTENSIONS
        target = relative if "/" in self.glob else relative.rsplit("/", 1)[-1]
        return fnmatch.fnmatchcase(target.lower(), self.glob.lower())

    def time_ok(self, path_text: str, modified: datetime | None) -> bool:
        """Keep by the date in ``path_text``, else by ``modified`` (aware or naive-local); with
        neither, keep (nothing says it is outside the window)."""
        if not self.has_time:
            return True
        span = date_in_path(path_text)
        if span is not None:
            start, end = span
            if self.since is not None and end <= _naive_wall(self.since):
                return False
            return not (self.until is not None and start >= _naive_wall(self.until))
        if modified is None:
            return True
        m = _aware(modified)
        if self.since is not None and m < _aware(self.since):
            return False
        return not (self.until is not None and m >= _aware(self.until))

    @staticmethod
    def from_timestamp(ts: float) -> datetime:
        return datetime.fromtimestamp(ts, UTC)
