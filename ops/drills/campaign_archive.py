"""The fault campaign's sources: the archive (distinct pictures the replay recognizer knows, plus
bad inputs), the second source (byte-identical copies of archive pictures and pictures of its
own), the bad-input corpus, and the listing the checker compares the output with: every image id
each source lists, with the SHA-256 of its bytes (the picture the server counts calls for; "" when
it cannot be read as a plain file: an archive member, a FIFO).

Bad inputs must each get exactly one outcome (a row with a clear code) and never cost a chunk. The
archive always holds five of its own: a truncated JPEG, a JPEG whose scan is garbage, a text file
named ``.jpg``, a 10 px PNG and an empty file; and the bad-input corpus
(:mod:`ocrserver.bad_corpus`: a folder with names that are not UTF-8, links and a FIFO, a tar, a
tar.gz, a zip and three manifests, 83 items) is written beside it, each of its sources enqueued
into the same run.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from PIL import Image

from ocrserver.bad_corpus import write_bad_corpus
from ocrserver.truth import distinct_copy, make_test_image, write_test_archive

__all__ = ["Listing", "build_sources", "list_source", "write_bad_inputs"]

_NEW_SALT = 50_000_000  # salts of the second source's own pictures (the archive uses 0..n, -1..-d)
_MAX_HASHED = 64 << 20  # a file larger than this is not read to hash it


def _jpeg(size: tuple[int, int] = (320, 240)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 100, 110)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def write_bad_inputs(folder: Path) -> list[str]:
    """Write the archive's own bad inputs into ``folder``; returns their file names."""
    good_jpeg = _jpeg()
    garbage = bytearray(good_jpeg)
    for i in range(len(garbage) // 2, len(garbage) - 2):  # scan data scrambled, markers intact
        garbage[i] = (garbage[i] * 31 + 7) % 256 if garbage[i] != 0xFF else 0x00
    files = {
        "bad-truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "bad-garbage-scan.jpg": bytes(garbage),
        "bad-text.jpg": b"this is not a picture, only text named .jpg\n" * 4,
        "bad-tiny.png": _png((10, 10)),
        "bad-empty.png": b"",
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(files)


@dataclass(frozen=True, slots=True)
class Listing:
    """What one source lists: image id -> SHA-256 of its bytes (hex; "" when not hashed)."""

    source: str
    images: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "images": self.images}


def build_sources(
    work: Path, images: int, bad_inputs: bool, copies: int, new: int, seed: int
) -> tuple[list[Path], dict[str, Listing]]:
    """The sources to enqueue, the archive first, then the second source (when ``copies`` or
    ``new``), then the bad-input corpus's; and the listings of the corpus's sources (what it says
    each lists)."""
    archive = work / "archive"
    write_test_archive(archive, images)
    if bad_inputs:
        write_bad_inputs(archive)
    sources = [archive]
    if copies or new:
        second = work / "second"
        second.mkdir(parents=True, exist_ok=True)
        rng = random.Random(seed)
        pool = sorted(p for p in archive.iterdir() if p.name.startswith(("img-", "pool-")))
        for i, src in enumerate(rng.sample(pool, min(copies, len(pool)))):
            (second / f"copy-{i:05d}-{src.name}").write_bytes(src.read_bytes())
        for i in range(new):
            picture = make_test_image([{"text": f"粤B{i:05d}"}])
            (second / f"own-{i:05d}.png").write_bytes(distinct_copy(picture, _NEW_SALT + i))
        sources.append(second)
    corpus: dict[str, Listing] = {}
    if bad_inputs:
        corpus = _write_corpus(work / "corpus")
        sources += [Path(s) for s in corpus]
    return sources, corpus


def _write_corpus(folder: Path) -> dict[str, Listing]:
    written = write_bad_corpus(folder)
    return {
        src: Listing(src, {e.image_id: _hash_of(e.source) for e in written.expected[src]})
        for src in written.sources
    }


def _hash_of(source: str) -> str:
    """SHA-256 of the bytes a source names: a plain local file (never a FIFO, never huge) or a
    member of a local tar or zip; "" for anything else or anything that cannot be read."""
    scheme, sep, rest = source.partition("://")
    try:
        if not sep:  # a plain path, as given
            return _digest(_read_file(os.fsencode(source)))
        if scheme == "file":
            return _digest(_read_file(_local(rest)))
        if scheme in ("tar", "zip"):
            path, member, *nth = rest.split("#")
            name = unquote(member, errors="surrogateescape")
            return _digest(_read_member(scheme, _local(path), name, int(nth[0]) if nth else 1))
    except (OSError, ValueError, EOFError, RuntimeError, tarfile.TarError, zipfile.BadZipFile, zlib.error):
        return ""
    return ""


def _local(encoded: str) -> bytes:
    """The raw bytes of a path as a URI carries it (percent-encoded, names need not be UTF-8)."""
    return os.fsencode(unquote(encoded, errors="surrogateescape"))


def _digest(data: bytes | None) -> str:
    return hashlib.sha256(data).hexdigest() if data is not None else ""


def _read_file(path: bytes) -> bytes | None:
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_HASHED:
        return None
    with open(path, "rb") as fh:
        return fh.read()


def _read_member(kind: str, path: bytes, member: str, nth: int) -> bytes | None:
    """The ``nth`` entry named ``member`` of a local archive (bounded in size)."""
    seen = 0
    if kind == "zip":
        with zipfile.ZipFile(os.fsdecode(path)) as zf:
            for info in zf.infolist():
                if info.filename == member and (seen := seen + 1) == nth:
                    return zf.read(info) if info.file_size <= _MAX_HASHED else None
        return None
    with tarfile.open(os.fsdecode(path), "r:*") as tf:
        for info in tf:
            if info.name == member and (seen := seen + 1) == nth:
                fh = tf.extractfile(info) if info.isreg() and info.size <= _MAX_HASHED else None
                return fh.read() if fh is not None else None
    return None


def list_source(source: Path, env: dict[str, str]) -> Listing:
    """The image ids ``carnumber enqueue`` lists for ``source``, each with the hash of its bytes."""
    from producers.sources import open_source
    from workers.config import Settings

    settings = Settings.from_env({k: v for k, v in env.items() if k.startswith(("CARNUMBER_", "ALIB"))})
    return Listing(
        str(source), {ref.image_id: _hash_of(ref.source) for ref in open_source(str(source), settings)}
    )
