"""The fault campaign's sources: the archive (distinct pictures the replay recognizer knows, plus
bad inputs), the second source (byte-identical copies of archive pictures and pictures of its
own), and the listing the checker compares the output with: every image id each source lists,
with the SHA-256 of its bytes (the picture the server counts calls for).

Bad inputs are untrusted-input cases that must each get exactly one outcome (a row with a clear
code) and never cost a chunk: a truncated JPEG, a JPEG whose scan is garbage, a text file named
``.jpg``, a 10 px PNG and an empty file; and, given a folder (``--bad-corpus``), a bad-input
corpus of any size (the untrusted-input issue's generator writes one), copied in as it is
(names, symlinks and all) under ``archive/corpus/``.
"""

from __future__ import annotations

import hashlib
import io
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from PIL import Image

from ocrserver.truth import distinct_copy, make_test_image, write_test_archive

__all__ = ["Listing", "build_sources", "list_source", "write_bad_inputs"]

_NEW_SALT = 50_000_000  # salts of the second source's own pictures (the archive uses 0..n, -1..-d)


def _jpeg(size: tuple[int, int] = (320, 240)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 100, 110)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def write_bad_inputs(folder: Path) -> list[str]:
    """Write the bad inputs into ``folder``; returns their file names."""
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


def build_sources(
    work: Path, images: int, bad_inputs: bool, copies: int, new: int, seed: int, corpus: str = ""
) -> list[Path]:
    """The archive (``images`` pictures, plus the bad inputs and the ``corpus`` folder's files)
    and, when ``copies`` or ``new``, the second source; returns their folders, the archive first."""
    archive = work / "archive"
    write_test_archive(archive, images)
    if bad_inputs:
        write_bad_inputs(archive)
    if corpus:
        shutil.copytree(corpus, archive / "corpus", symlinks=True)
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
    return sources


@dataclass(frozen=True, slots=True)
class Listing:
    """What one source lists: image id -> SHA-256 of its bytes (hex)."""

    source: str
    images: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "images": self.images}


def list_source(source: Path, env: dict[str, str]) -> Listing:
    """The image ids ``carnumber enqueue`` lists for ``source``, each with the hash of its bytes
    (a local folder: the ref's source is the file's path or ``file://`` URI)."""
    from producers.sources import open_source
    from workers.config import Settings

    settings = Settings.from_env({k: v for k, v in env.items() if k.startswith(("CARNUMBER_", "ALIB"))})
    images: dict[str, str] = {}
    for ref in open_source(str(source), settings):
        path = unquote(urlsplit(ref.source).path) if "://" in ref.source else ref.source
        try:
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError:
            digest = ""
        images[ref.image_id] = digest
    return Listing(str(source), images)
