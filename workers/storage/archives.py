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

Archives are untrusted data: a member that cannot be read (encrypted, corrupt compressed data,
a CRC mismatch, a link or device instead of a file, cut short by a truncated archive) becomes that
member's :class:`ImageRejected` with ``local.archive``, never an exception out of :meth:`read`.
A name that occurs twice is read at its first occurrence (what the producer lists; the second is
refused there). A zip entry flagged UTF-8 whose name is not UTF-8 would make :mod:`zipfile` refuse
the whole archive; :func:`open_zip` reads such names as cp437 instead (as for every unflagged name),
so only that name looks odd.
"""

from __future__ import annotations

import io
import lzma
import os
import struct
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

__all__ = [
    "STREAM_ERRORS",
    "ArchiveReader",
    "close_zip",
    "compression_of",
    "member_error",
    "open_zip",
    "tar_kind",
]

_MAGIC = ((b"\x1f\x8b", "gz"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"))

Result = bytes | CarnumberError

# What a damaged archive raises while it is read: tarfile's own errors, a cut stream, the
# decompressors' errors, a name that does not decode.
STREAM_ERRORS = (
    tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError
)


def compression_of(head: bytes) -> str:
    """``gz``, ``bz2``, ``xz`` or ``""`` (uncompressed) from an archive's first bytes."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return ""


def _too_large(size: int) -> ImageRejected:
    return ImageRejected("local.imageTooLarge", f"member is {size} bytes; the API allows at most {MAX_BYTES}")


def member_error(name: str, exc: BaseException) -> ImageRejected:
    """The ``local.archive`` refusal of member ``name`` that raised ``exc`` when read."""
    if isinstance(exc, RuntimeError) and "encrypted" in str(exc):
        why = "it is encrypted (password protected)"
    elif isinstance(exc, NotImplementedError):
        why = f"its compression or encryption is not supported ({exc})"
    elif isinstance(exc, zlib.error | lzma.LZMAError | EOFError):
        why = f"its compressed data is corrupt ({type(exc).__name__})"
    elif isinstance(exc, zipfile.BadZipFile) and "CRC" in str(exc):
        why = "its data does not match its checksum (CRC-32)"
    else:
        why = f"it cannot be read ({type(exc).__name__})"
    return ImageRejected("local.archive", f"member {name!r}: {why}")


def _not_regular(name: str, kind: str) -> ImageRejected:
    return ImageRejected("local.archive", f"member {name!r} is {kind}, not a regular file")


def tar_kind(info: tarfile.TarInfo) -> str:
    """What a tar member is, in words, for a refusal."""
    if info.issym():
        return "a symbolic link"
    if info.islnk():
        return "a hard link"
    if info.isdir():
        return "a directory"
    if info.issparse():
        return "a sparse file"
    if info.isfifo() or info.ischr() or info.isblk():
        return "a device or pipe"
    return "not a file"


class _Patched(io.RawIOBase):
    """A local file read through a few byte patches (offset -> replacement bytes)."""

    def __init__(self, path: str, patches: dict[int, bytes]) -> None:
        self.fh = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.patches = patches
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = self.fh.seek(offset, whence)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        self.fh.seek(self.pos)
        data = bytearray(self.fh.read(len(buffer)))
        for at, patch in self.patches.items():
            lo, hi = max(at, self.pos), min(at + len(patch), self.pos + len(data))
            if lo < hi:
                data[lo - self.pos : hi - self.pos] = patch[lo - at : hi - at]
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        self.fh.close()
        super().close()


def _utf8_flag_patches(path: str) -> dict[int, bytes]:
    """Patches that clear the UTF-8 flag of central-directory entries (and their local headers)
    whose names are not UTF-8. Empty when the central directory cannot be found."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 65_557))
        tail = fh.read()
        end = tail.rfind(b"PK\x05\x06")
        if end < 0 or len(tail) - end < 22:
            return {}
        cd_size, cd_offset = struct.unpack_from("<II", tail, end + 12)
        cd_start = size - len(tail) + end - cd_size
        if cd_offset == 0xFFFFFFFF or cd_start < 0:
            return {}  # zip64: left as it is (zipfile refuses it as before)
        fh.seek(cd_start)
        cd = fh.read(cd_size)
    patches: dict[int, bytes] = {}
    at = 0
    while at + 46 <= len(cd) and cd[at : at + 4] == b"PK\x01\x02":
        flags = struct.unpack_from("<H", cd, at + 8)[0]
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", cd, at + 28)
        local = struct.unpack_from("<I", cd, at + 42)[0]
        name = cd[at + 46 : at + 46 + name_len]
        if flags & 0x800:
            try:
                name.decode("utf-8")
            except UnicodeDecodeError:
                patches[cd_start + at + 8] = struct.pack("<H", flags & ~0x800)
                if local + 8 <= size:
                    with open(path, "rb") as fh:
                        fh.seek(local)
                        header = fh.read(8)
                    if header[:4] == b"PK\x03\x04":
                        local_flags = struct.unpack_from("<H", header, 6)[0]
                        patches[local + 6] = struct.pack("<H", local_flags & ~0x800)
        at += 46 + name_len + extra_len + comment_len
    return patches


def open_zip(path: str) -> zipfile.ZipFile:
    """``zipfile.ZipFile(path)``, except that names flagged UTF-8 that are not UTF-8 are read as
    cp437 (zipfile would refuse the whole archive). The caller closes it (with its file)."""
    try:
        return zipfile.ZipFile(path)
    except UnicodeDecodeError:
        patches = _utf8_flag_patches(path)
        if not patches:
            raise zipfile.BadZipFile("a member name is flagged UTF-8 but is not") from None
        raw = _Patched(path, patches)
        try:
            zf = zipfile.ZipFile(raw)  # type: ignore[arg-type]
        except BaseException:
            raw.close()
            raise
        zf._carnumber_raw = raw  # type: ignore[attr-defined]  # closed with the archive
        return zf


def close_zip(zf: zipfile.ZipFile) -> None:
    zf.close()
    raw = getattr(zf, "_carnumber_raw", None)
    if raw is not None:
        raw.close()


class _Zip:
    def __init__(self, path: str) -> None:
        self.zf = open_zip(path)
        self.first: dict[str, zipfile.ZipInfo] = {}  # name -> its first entry (zipfile keeps the last)
        for info in self.zf.infolist():
            self.first.setdefault(info.filename, info)

    def read(self, names: Sequence[str]) -> dict[str, Result]:
        out: dict[str, Result] = {}
        for name in names:
            info = self.first.get(name)
            if info is None:
                out[name] = InputError(f"member {name!r} is not in the archive")
            elif info.is_dir():
                out[name] = _not_regular(name, "a directory")
            elif info.file_size > MAX_BYTES:
                out[name] = _too_large(info.file_size)
            else:
                try:
                    with self.zf.open(info) as member:
                        # Never more than the declared size (a zip bomb's data goes on); a
                        # short or long stream fails the CRC check.
                        out[name] = member.read(MAX_BYTES + 1)
                except Exception as exc:  # untrusted bytes: any failure is this member's
                    out[name] = member_error(name, exc)
        return out

    def close(self) -> None:
        close_zip(self.zf)


class _SeekableTar:
    """Uncompressed tar: scan headers forward on demand, remember where each member's data is."""

    def __init__(self, path: str) -> None:
        self.fh: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.tf = tarfile.open(fileobj=self.fh, mode="r:")  # noqa: SIM115
        # name -> (offset, size, regular, what it is)
        self.index: dict[str, tuple[int, int, bool, str]] = {}
        self.done = False

    def _scan_until(self, wanted: set[str]) -> None:
        missing = wanted - self.index.keys()
        while missing and not self.done:
            try:
                info = self.tf.next()
            except STREAM_ERRORS:  # damaged past here: what is indexed stays readable
                info = None
            self.tf.members.clear()  # tarfile keeps every TarInfo; our index is smaller
            if info is None:
                self.done = True
                break
            regular = info.isreg() and not info.issparse()
            if info.name not in self.index:  # the first occurrence of a name is the one read
                self.index[info.name] = (info.offset_data, info.size, regular, tar_kind(info))
            missing.discard(info.name)

    def read(self, names: Sequence[str]) -> dict[str, Result]:
        self._scan_until(set(names))
        out: dict[str, Result] = {}
        for name in names:
            entry = self.index.get(name)
            if entry is None:
                out[name] = InputError(f"member {name!r} is not in the archive")
                continue
            offset, size, regular, kind = entry
            if not regular:
                out[name] = _not_regular(name, kind)
            elif size > MAX_BYTES:
                out[name] = _too_large(size)
            else:
                self.fh.seek(offset)
                data = self.fh.read(size)
                short = ImageRejected("local.archive", f"member {name!r} is cut short")
                out[name] = data if len(data) == size else short
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
        except Exception as exc:  # STREAM_ERRORS, and whatever else hostile bytes raise
            # A truncated or corrupt stream: what was read stays good, the rest is unreadable.
            self.eof = self.broken = True
            err = ImageRejected(
                "local.archive",
                f"the archive is truncated or corrupt after member {self.position} ({type(exc).__name__})",
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
            if not info.isreg() or info.issparse():
                out[info.name] = _not_regular(info.name, tar_kind(info))
            elif info.size > MAX_BYTES:
                out[info.name] = _too_large(info.size)
            else:
                reader = self.tf.extractfile(info)
                assert reader is not None
                out[info.name] = reader.read()  # may fail mid-member: it is still wanted then
            wanted.discard(info.name)

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
            except Exception as exc:  # untrusted bytes: never out of a chunk
                self._drop(kind, path)
                err = ImageRejected(
                    "local.archive", f"archive {path!r} is not a readable {kind} ({type(exc).__name__})"
                )
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
