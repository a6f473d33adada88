"""Read members of local ``.tar``, ``.tar.gz``/``.tgz``/``.tar.bz2``/``.tar.xz`` and ``.zip`` archives.

A chunk holds consecutive members of one archive, so :meth:`ArchiveReader.read` takes all the
members wanted from one archive and opens it once. Between chunks the reader keeps a few open
archives (LRU, keyed by path + size + mtime, so a rewritten archive is reopened):

* ``.zip``: the central directory gives every member's offset; reads are random access.
* uncompressed ``.tar``: headers are scanned forward once (one 512-byte read and a seek per
  member) into an index ``name -> (data offset, size)``; later chunks seek straight to their
  members. The index costs ~150 bytes per member scanned.
* compressed tar: gzip/bzip2/xz cannot seek, so reaching member *k* means decompressing all
  members before it. The reader keeps a *cursor*: the open stream, positioned after the last
  member it read. A chunk whose members lie ahead of the cursor (the next chunk, in order)
  continues from there, so one worker reading a ``.tar.gz``'s chunks in order decompresses it
  once. A chunk behind the cursor restarts from the beginning: for an archive of N members split
  into chunks handed to W workers, the cost can grow to ~N²/(2·chunk) member reads in the
  worst case. For big archives, prefer ``.tar`` or ``.zip`` (random access) — see
  ops/design/sources.md.

A member larger than the API's limit is refused from its header without reading it.
"""

from __future__ import annotations

import lzma
import os
import tarfile
import threading
import weakref
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import BinaryIO

from workers.errors import CarnumberError, ImageRejected, InputError
from workers.imagecheck import MAX_BYTES

__all__ = ["ArchiveReader", "compression_of"]

_MAGIC = ((b"\x1f\x8b", "gz"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"))

Result = bytes | CarnumberError

_STREAM_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


def compression_of(head: bytes) -> str:
    """``gz``, ``bz2``, ``xz`` or ``""`` (uncompressed) from an archive's first bytes."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return ""


def _too_large(size: int) -> ImageRejected:
    return ImageRejected("local.imageTooLarge", f"member is {size} bytes; the API allows at most {MAX_BYTES}")


class _Zip:
    def __init__(self, path: str) -> None:
        self.zf = zipfile.ZipFile(path)

    def read(self, names: Sequence[str]) -> dict[str, Result]:
        out: dict[str, Result] = {}
        for name in names:
            try:
                info = self.zf.getinfo(name)
            except KeyError:
                out[name] = InputError(f"member {name!r} is not in the archive")
                continue
            if info.is_dir():
                out[name] = InputError(f"member {name!r} is a directory")
            elif info.file_size > MAX_BYTES:
                out[name] = _too_large(info.file_size)
            else:
                try:
                    out[name] = self.zf.read(info)
                except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
                    out[name] = InputError(f"member {name!r} unreadable ({type(exc).__name__})")
        return out

    def close(self) -> None:
        self.zf.close()


class _SeekableTar:
    """Uncompressed tar: scan headers forward on demand, remember where each member's data is."""

    def __init__(self, path: str) -> None:
        self.fh: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.tf = tarfile.open(fileobj=self.fh, mode="r:")  # noqa: SIM115
        self.index: dict[str, tuple[int, int, bool]] = {}  # name -> (offset, size, regular)
        self.done = False

    def _scan_until(self, wanted: set[str]) -> None:
        missing = wanted - self.index.keys()
        while missing and not self.done:
            info = self.tf.next()
            self.tf.members.clear()  # tarfile keeps every TarInfo; our index is smaller
            if info is None:
                self.done = True
                break
            regular = info.isreg() and not info.issparse()
            self.index[info.name] = (info.offset_data, info.size, regular)
            missing.discard(info.name)

    def read(self, names: Sequence[str]) -> dict[str, Result]:
        self._scan_until(set(names))
        out: dict[str, Result] = {}
        for name in names:
            entry = self.index.get(name)
            if entry is None:
                out[name] = InputError(f"member {name!r} is not in the archive")
                continue
            offset, size, regular = entry
            if not regular:
                out[name] = InputError(f"member {name!r} is not a regular file")
            elif size > MAX_BYTES:
                out[name] = _too_large(size)
            else:
                self.fh.seek(offset)
                data = self.fh.read(size)
                out[name] = (
                    data
                    if len(data) == size
                    else InputError(f"member {name!r} is cut short: the archive is truncated")
                )
        return out

    def close(self) -> None:
        self.tf.close()
        self.fh.close()


class _StreamTar:
    """Compressed tar: a forward-only cursor; restart from the top only when it must."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fh: BinaryIO | None = None
        self.tf: tarfile.TarFile | None = None
        self.position = 0  # members passed by the cursor
        self.eof = False
        self.broken = False  # the stream failed to decode: do not restart within this call
        self._open()

    def _open(self) -> None:
        self.close()
        self.fh = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        self.tf = tarfile.open(fileobj=self.fh, mode="r|*")  # noqa: SIM115
        self.position = 0
        self.eof = False
        self.broken = False

    def _scan(self, wanted: set[str], out: dict[str, Result], stop_at: int | None) -> None:
        try:
            self._scan_raw(wanted, out, stop_at)
        except _STREAM_ERRORS as exc:
            # A truncated or corrupt stream: what was read stays good, the rest is unreadable.
            self.eof = self.broken = True
            err = InputError(
                f"archive is truncated or corrupt after member {self.position} ({type(exc).__name__})"
            )
            for name in wanted:
                out[name] = err
            wanted.clear()

    def _scan_raw(self, wanted: set[str], out: dict[str, Result], stop_at: int | None) -> None:
        assert self.tf is not None
        while wanted and not self.eof and (stop_at is None or self.position < stop_at):
            info = self.tf.next()
            self.tf.members.clear()
            if info is None:
                self.eof = True
                break
            self.position += 1
            if info.name not in wanted:
                continue
            wanted.discard(info.name)
            if not info.isreg() or info.issparse():
                out[info.name] = InputError(f"member {info.name!r} is not a regular file")
            elif info.size > MAX_BYTES:
                out[info.name] = _too_large(info.size)
            else:
                reader = self.tf.extractfile(info)
                assert reader is not None
                out[info.name] = reader.read()

    def read(self, names: Sequence[str]) -> dict[str, Result]:
        out: dict[str, Result] = {}
        wanted = set(names)
        if self.eof:
            self._open()  # a cursor at the end (or past a corrupt spot) can only restart
        started_at = self.position
        self._scan(wanted, out, None)
        if wanted and started_at > 0 and not self.broken:
            self._open()  # what is still missing lies behind where the cursor started
            self._scan(wanted, out, started_at)
        for name in wanted:
            out[name] = InputError(f"member {name!r} is not in the archive")
        return out

    def close(self) -> None:
        if self.tf is not None:
            self.tf.close()
        if self.fh is not None:
            self.fh.close()
        self.tf = self.fh = None


_Handle = _Zip | _SeekableTar | _StreamTar


class ArchiveReader:
    """Reads archive members for chunks; keeps up to ``max_open`` archives open between calls.

    Thread-safe: one lock around each :meth:`read` (archive handles are stateful).
    """

    def __init__(self, max_open: int = 4) -> None:
        self.max_open = max_open
        self._open: OrderedDict[tuple[str, str, int, int], _Handle] = OrderedDict()
        self._lock = threading.Lock()
        # A reader dropped without close() still closes its files (no ResourceWarning).
        weakref.finalize(self, _close_all, self._open)

    def read(self, kind: str, path: str, names: Sequence[str]) -> dict[str, Result]:
        """Bytes (or the error) for each of ``names`` inside the archive at ``path``.

        Errors about the whole archive (missing, not an archive) are returned for every name.
        """
        with self._lock:
            try:
                handle = self._handle(kind, path)
                return handle.read(names)
            except FileNotFoundError:
                err: CarnumberError = InputError(f"archive {path!r} not found")
            except (PermissionError, IsADirectoryError) as exc:
                err = InputError(f"archive {path!r} unreadable ({type(exc).__name__})")
            except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
                self._drop(kind, path)
                err = InputError(f"archive {path!r} is not a readable {kind} ({type(exc).__name__})")
            return {name: err for name in names}

    def _handle(self, kind: str, path: str) -> _Handle:
        st = os.stat(path)
        key = (kind, path, st.st_size, st.st_mtime_ns)
        handle = self._open.get(key)
        if handle is not None:
            self._open.move_to_end(key)
            return handle
        self._drop(kind, path)  # an older version of the same archive
        if kind == "zip":
            handle = _Zip(path)
        else:
            with open(path, "rb") as fh:
                head = fh.read(6)
            handle = _StreamTar(path) if compression_of(head) else _SeekableTar(path)
        self._open[key] = handle
        while len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        return handle

    def _drop(self, kind: str, path: str) -> None:
        for key in [k for k in self._open if k[0] == kind and k[1] == path]:
            self._open.pop(key).close()

    def close(self) -> None:
        with self._lock:
            _close_all(self._open)


def _close_all(handles: OrderedDict[tuple[str, str, int, int], _Handle]) -> None:
    for handle in handles.values():
        handle.close()
    handles.clear()
