"""A generated corpus of bad input, and what carnumber must make of each item.

Camera archives are old, large and messy. :func:`write_bad_corpus` writes, under one folder, the
odd items they hold — names that are not UTF-8, links, pipes, damaged and hostile archive members,
pictures the service refuses or that only look odd, broken manifest lines — together with the
outcome each one must get: ``answered`` (a row with status ``ok`` or ``no_plate``) or the code of
its one failed row. Every item the producer lists gets exactly one row; nothing may cost its
neighbours, the chunk or the producer.

Used by the test suite (``tests/test_bad_corpus.py``) and by the fault campaign, which puts the
corpus into its drill archive::

    from ocrserver.bad_corpus import write_bad_corpus
    corpus = write_bad_corpus(Path("/data/drill/bad"))   # into the drill folder
    corpus.expected["/data/drill/bad"]   # what the folder source must give, item by item
    corpus.sources                       # the folder, then each archive and manifest

``corpus.sources[0]`` is ``folder`` itself: enqueued as a folder it lists the loose files only
(archives and manifests have no image extension, and the images the manifests name end in
``.img``), so enqueuing the folder alone is a valid drill. Each further source (``bad.tar``,
``bad.tar.gz``, ``bad.zip``, ``bad.csv``, ``bad.jsonl``, ``bad.txt``) lists items of its own; all of
them may go into one run. Outcomes assume the default settings; ``Expected.reencoded`` is the
outcome when ``CARNUMBER_REENCODE_ABOVE_BYTES`` is set below the item's size (``1`` re-encodes
every picture). Folder items that need a POSIX filesystem (a FIFO, a symlink, a name that is not
UTF-8) are written only where the platform allows. Pictures carry no plates, so the replay
recognizer answers ``no_plate``; nothing is random: the same call writes the same bytes.
"""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from workers.message import image_id_for
from workers.storage.uris import archive_uri, file_uri, manifest_line_uri

__all__ = ["ANSWERED", "BadCorpus", "Expected", "raw_zip", "write_bad_corpus", "zip_entry"]

ANSWERED = "answered"  # a row with status ok or no_plate
_BIG_FIELD = 5 * 1024 * 1024  # a manifest field of 5 MB


@dataclass(frozen=True, slots=True)
class Expected:
    """One item the producer lists: its canonical ``source``, the ``outcome`` it must get
    (:data:`ANSWERED` or a ``local.*`` code), ``why`` it is in the corpus, and ``reencoded``, its
    outcome with re-encoding on when that differs."""

    source: str
    outcome: str
    why: str
    reencoded: str | None = None

    @property
    def image_id(self) -> str:
        return image_id_for(self.source)

    def outcome_with(self, reencode: bool) -> str:
        return self.reencoded if reencode and self.reencoded is not None else self.outcome


@dataclass(slots=True)
class BadCorpus:
    """What :func:`write_bad_corpus` wrote: ``sources`` to enqueue (absolute paths) and, for each,
    the items it lists in the order it lists them."""

    folder: Path
    sources: list[str] = field(default_factory=list)
    expected: dict[str, list[Expected]] = field(default_factory=dict)

    def all(self) -> list[Expected]:
        return [e for items in self.expected.values() for e in items]


# -- pictures ---------------------------------------------------------------------------------


def _save(im: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


def _rgb(w: int, h: int, shade: int) -> Image.Image:
    return Image.new("RGB", (w, h), (shade % 256, (shade * 7) % 256, (shade * 13) % 256))


def _jpeg(shade: int, w: int = 64, h: int = 48) -> bytes:
    return _save(_rgb(w, h, shade), "JPEG", quality=90)


def _corrupt_idat_png() -> bytes:
    """A PNG whose header and IEND are fine but whose pixel data does not inflate."""
    good = _save(_rgb(300, 200, 99), "PNG")
    at = good.index(b"IDAT")
    length = struct.unpack(">I", good[at - 4 : at])[0]
    junk = bytes((i * 37 + 11) % 256 for i in range(length))
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + junk) & 0xFFFFFFFF)  # a valid chunk of bad data
    return good[: at + 4] + junk + crc + good[at + 8 + length :]


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° CW to display
    return _save(_rgb(80, 40, 5), "JPEG", exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [_rgb(64, 48, i).convert("P") for i in range(3)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _pictures() -> dict[str, tuple[bytes, str, str, str | None]]:
    """name -> (bytes, outcome, why, outcome when re-encoded)."""
    png = _save(_rgb(120, 80, 3), "PNG")
    jpg = _jpeg(1, 320, 240)
    return {
        "ok-plain.jpg": (_jpeg(2), ANSWERED, "an ordinary picture beside the odd ones", None),
        "empty.jpg": (b"", "local.emptyImage", "0 bytes", None),
        "truncated.jpg": (jpg[: len(jpg) // 2], "local.truncatedImage", "a JPEG cut in half", None),
        "truncated.png": (png[: len(png) // 2], "local.truncatedImage", "a PNG cut in half", None),
        "ten-px.png": (_save(_rgb(10, 10, 4), "PNG"), "local.imageTooSmall", "10 x 10 px", None),
        "wide-9000px.png": (
            _save(_rgb(9000, 200, 6), "PNG"),
            "local.imageDimensionTooLarge",
            "9000 px wide",
            None,
        ),
        "aspect-60.png": (_save(_rgb(1200, 20, 7), "PNG"), "local.aspectRatio", "aspect ratio 60", None),
        "doc-pdf.jpg": (
            b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n",
            "local.unsupportedFormat",
            "a PDF named .jpg",
            None,
        ),
        "notes-text.jpg": (b"plate list\n" * 50, "local.unsupportedFormat", "text named .jpg", None),
        "cmyk.jpg": (
            _save(Image.new("CMYK", (64, 48), (0, 50, 100, 0)), "JPEG"),
            ANSWERED,
            "a CMYK JPEG",
            None,
        ),
        "sixteen-bit.png": (
            _save(Image.new("I;16", (64, 48), 40000), "PNG"),
            ANSWERED,
            "a 16-bit greyscale PNG",
            None,
        ),
        "animated.gif": (_animated_gif(), ANSWERED, "an animated GIF (3 frames)", None),
        "exif-rotated.jpg": (_exif_rotated_jpeg(), ANSWERED, "a JPEG with EXIF orientation 6", None),
        "corrupt-idat.png": (
            _corrupt_idat_png(),
            ANSWERED,
            "a PNG whose pixel data does not inflate (the header checks pass)",
            "local.decode",
        ),
        "name with %41 #hash ?q.jpg": (_jpeg(8), ANSWERED, "% # ? in a name", None),
    }


# -- the folder ---------------------------------------------------------------------------------


def _write_folder(folder: Path) -> list[Expected]:
    items: list[tuple[str, Expected]] = []  # (sort key: raw name bytes, expected)

    def add(raw_name: bytes, data: bytes, outcome: str, why: str, reencoded: str | None = None) -> None:
        path = os.fsencode(folder) + b"/" + raw_name
        with open(path, "wb") as fh:
            fh.write(data)
        items.append((raw_name, Expected(file_uri(os.fsdecode(path)), outcome, why, reencoded)))

    for name, (data, outcome, why, reencoded) in _pictures().items():
        add(name.encode(), data, outcome, why, reencoded)
    if os.name == "posix":
        gbk = "车牌-粤B12345".encode("gbk") + b".jpg"  # not UTF-8: a Windows tool's GBK name
        add(gbk, _jpeg(9), ANSWERED, "a GBK file name (not UTF-8)")
        add(b"latin-\xe9t\xe9.jpg", _jpeg(10), ANSWERED, "a Latin-1 file name (not UTF-8)")
        link = folder / "link-outside.jpg"
        link.symlink_to("/nonexistent-carnumber-corpus/outside.jpg")
        items.append(
            (b"link-outside.jpg", Expected(file_uri(str(link)), "local.link", "a symlink out of the folder"))
        )
        inner = folder / "link-inside.jpg"
        inner.symlink_to("ok-plain.jpg")
        items.append(
            (b"link-inside.jpg", Expected(file_uri(str(inner)), ANSWERED, "a symlink to a file inside"))
        )
        if hasattr(os, "mkfifo"):
            fifo = folder / "pipe.jpg"
            os.mkfifo(fifo)
            items.append((b"pipe.jpg", Expected(file_uri(str(fifo)), "local.input", "a FIFO named .jpg")))
    return [e for _, e in sorted(items, key=lambda t: t[0])]


# -- tar -------------------------------------------------------------------------------------------


def _tar_bytes(compress: bool) -> tuple[bytes, list[tuple[str, str, str]]]:
    """A tar (GNU format) of odd members, and (member name, outcome, why) in archive order. The
    last member declares 5 GB and the archive ends in its header: a half-copied tar."""
    buf = io.BytesIO()
    listed: list[tuple[str, str, str]] = []
    gbk = os.fsdecode("车牌".encode("gbk") + b".jpg")  # surrogate escapes, as tarfile reads it
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:

        def member(name: str, data: bytes, outcome: str, why: str, kind: bytes = tarfile.REGTYPE) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mtime = kind, 1_700_000_000
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                info.linkname = "ok.jpg" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
                tf.addfile(info)
            listed.append((name, outcome, why))

        member("ok.jpg", _jpeg(20), ANSWERED, "an ordinary member")
        member(gbk, _jpeg(21), ANSWERED, "a GBK member name (not UTF-8)")
        member("../../escape.jpg", _jpeg(22), ANSWERED, "a '..' member name: data, never a path")
        member("/abs/path.jpg", _jpeg(23), ANSWERED, "an absolute member name")
        member("link.jpg", b"", "local.archive", "a symlink member", tarfile.SYMTYPE)
        member("hard.jpg", b"", "local.archive", "a hard link member", tarfile.LNKTYPE)
        member("fifo.jpg", b"", "local.archive", "a FIFO member", tarfile.FIFOTYPE)
        member("dup.jpg", _jpeg(24), ANSWERED, "the first of two members with one name")
        member("dup.jpg", _jpeg(25), "local.archive", "a second member with the same name")
        member("empty.jpg", b"", "local.emptyImage", "an empty member")
        member("doc.jpg", b"%PDF-1.4\n%%EOF\n", "local.unsupportedFormat", "a PDF member named .jpg")
        end = tf.offset  # where the end-of-archive blocks begin
    huge = tarfile.TarInfo("huge.jpg")
    huge.size, huge.mtime = 5 * 1024**3, 1_700_000_000
    listed.append(("huge.jpg", "local.imageTooLarge", "declares 5 GB; the archive ends in its header"))
    data = buf.getvalue()[:end] + huge.tobuf(format=tarfile.GNU_FORMAT)  # cut there: half-copied
    return (_gzip(data) if compress else data), listed


def _gzip(data: bytes) -> bytes:
    """``data`` gzip-compressed, deterministically (no time or name in the header)."""
    import gzip

    return gzip.compress(data, mtime=0)


# -- zip -------------------------------------------------------------------------------------------


def zip_entry(
    name: bytes,
    stored: bytes,
    *,
    method: int = 0,
    flags: int = 0,
    crc: int | None = None,
    size: int | None = None,
) -> tuple[bytes, bytes, int, int, int, int]:
    """(name, data as stored, method, flags, crc, declared size)."""
    return (
        name,
        stored,
        method,
        flags,
        zlib.crc32(stored) if crc is None else crc,
        len(stored) if size is None else size,
    )


def raw_zip(entries: list[tuple[bytes, bytes, int, int, int, int]]) -> bytes:
    """A zip written byte by byte, so its names, flags, sizes and checksums can lie."""
    out, central = io.BytesIO(), io.BytesIO()
    for name, stored, method, flags, crc, size in entries:
        offset = out.tell()
        header = struct.pack(
            "<4sHHHHHIIIHH", b"PK\x03\x04", 20, flags, method, 0, 0x21, crc, len(stored), size, len(name), 0
        )
        out.write(header + name + stored)
        central.write(
            struct.pack(
                "<4sHHHHHHIIIHHHHHII",
                b"PK\x01\x02",
                20,
                20,
                flags,
                method,
                0,
                0x21,
                crc,
                len(stored),
                size,
                len(name),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            + name
        )
    cd = central.getvalue()
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(cd), out.tell(), 0)
    return out.getvalue() + cd + end


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def _zip_bytes() -> tuple[bytes, list[tuple[str, str, str]]]:
    gbk = "车牌".encode("gbk") + b".jpg"
    bomb = b"\0" * (20 * 1024 * 1024)
    ok, first, second = _jpeg(30), _jpeg(31), _jpeg(32)
    entries = [
        (zip_entry(b"ok.jpg", ok), ANSWERED, "an ordinary member"),
        (zip_entry(gbk, _jpeg(33)), ANSWERED, "a GBK name without the UTF-8 flag (read as cp437)"),
        (zip_entry(b"flagged-" + gbk, _jpeg(34), flags=0x800), ANSWERED, "a GBK name flagged UTF-8"),
        (zip_entry(b"../escape.jpg", _jpeg(35)), ANSWERED, "a '..' member name: data, never a path"),
        (zip_entry(b"sub/", b""), None, "a directory entry: not an item"),
        (
            zip_entry(b"encrypted.jpg", b"\x01" * 40 + ok[:200], flags=0x1),
            "local.archive",
            "an encrypted member",
        ),
        (
            zip_entry(
                b"corrupt.jpg", b"\xff\xfe garbage, not deflate", method=8, size=len(ok), crc=zlib.crc32(ok)
            ),
            "local.archive",
            "corrupt deflate data",
        ),
        (
            zip_entry(b"bad-crc.jpg", ok, crc=zlib.crc32(ok) ^ 1),
            "local.archive",
            "a CRC-32 that does not match",
        ),
        (
            zip_entry(b"bomb.jpg", _deflate(bomb), method=8, size=1000, crc=zlib.crc32(bomb)),
            "local.archive",
            "a zip bomb: 20 MB of data behind a 1000-byte declared size",
        ),
        (zip_entry(b"huge.jpg", ok, size=4_000_000_000), "local.imageTooLarge", "declares 4 GB"),
        (
            zip_entry(b"wavpack.jpg", ok, method=97),
            "local.archive",
            "a compression method zipfile cannot read",
        ),
        (zip_entry(b"dup.jpg", first), ANSWERED, "the first of two entries with one name"),
        (zip_entry(b"dup.jpg", second), "local.archive", "a second entry with the same name"),
        (zip_entry(b"empty.jpg", b""), "local.emptyImage", "an empty member"),
    ]
    listed = [
        (name.decode("utf-8") if flags & 0x800 and _is_utf8(name) else name.decode("cp437"), outcome, why)
        for (name, _, _, flags, _, _), outcome, why in entries
        if outcome is not None
    ]
    return raw_zip([e for e, _, _ in entries]), listed


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# -- manifests ---------------------------------------------------------------------------------------


def _manifest_images(folder: Path) -> dict[str, Path]:
    """Pictures the manifests name, ending in .img so the folder source does not list them; each
    manifest names its own, so all sources can go into one run."""
    images = {
        "m-csv-1": _jpeg(40),
        "m-csv-2": _jpeg(41),
        "m-csv-3": _jpeg(42),
        "m-csv-pdf": b"%PDF-1.4\n%%EOF\n",
        "m-json-1": _jpeg(43),
        "m-json-2": _jpeg(44),
        "m-txt-1": _jpeg(45),
    }
    paths = {}
    for name, data in images.items():
        path = folder / f"{name}.img"
        path.write_bytes(data)
        paths[name] = path
    return paths


def _expired(kind: str) -> str:
    """A signed URL whose signature expired in 2020."""
    if kind == "aws":
        return (
            "https://cams.s3.amazonaws.com/old.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=AKIAOLD%2F20200101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20200101T000000Z"
            "&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=0123456789abcdef"
        )
    return (
        "https://cams.blob.core.windows.net/c/old.jpg?sv=2022-11-02&sr=b&sp=r"
        "&st=2020-01-01T00:00:00Z&se=2020-01-02T00:00:00Z&spr=https&sig=c2lnbmF0dXJl%3D"
    )


def _lines(path: Path, rows: list[tuple[bytes, Expected | None]]) -> list[Expected]:
    path.write_bytes(b"\n".join(raw for raw, _ in rows) + b"\n")
    return [e for _, e in rows if e is not None]


def _write_csv(path: Path, img: dict[str, Path]) -> list[Expected]:
    line = lambda n, code, why: Expected(manifest_line_uri(str(path), n), code, why)  # noqa: E731
    expired = _expired("azure")
    return _lines(
        path,
        [
            (b"path,camera,note", None),  # 1: the header
            (
                f"{img['m-csv-1']},c1,ok".encode(),
                Expected(file_uri(str(img["m-csv-1"])), ANSWERED, "a good row"),
            ),
            (b"", None),  # 3: a blank line
            (
                b'm-csv-2.img,c2,"a, quoted note"',
                Expected(file_uri(str(img["m-csv-2"])), ANSWERED, "relative"),
            ),
            (b"m-csv-3.img,c3," + "车牌".encode("gbk"), line(5, "local.manifest", "a GBK field (not UTF-8)")),
            (b"m-csv-1.img,c1,again", None),  # 6: the same image as line 2: not a second item
            (b"m-csv-3.img,c3,big,extra", line(7, "local.manifest", "four fields under three columns")),
            (b"m-csv-3.img,c3," + b"n" * _BIG_FIELD, line(8, "local.manifest", "a 5 MB field")),
            (
                b"../../etc/passwd.img,c9,",
                line(9, "local.outsideRoot", "a path out of the manifest's folder"),
            ),
            (
                f"{expired},c4,".encode(),
                Expected(expired.split("?", 1)[0], "local.urlExpired", "an Azure SAS expired in 2020"),
            ),
            (
                b"m-csv-pdf.img,c5,pdf",
                Expected(file_uri(str(img["m-csv-pdf"])), "local.unsupportedFormat", "a PDF"),
            ),
            (b",c6,no path", line(12, "local.manifest", "no url or path value")),
            (
                b"m-csv-3.img,c3,fine",
                Expected(file_uri(str(img["m-csv-3"])), ANSWERED, "after the bad lines"),
            ),
        ],
    )


def _write_jsonl(path: Path, img: dict[str, Path]) -> list[Expected]:
    import json

    line = lambda n, code, why: Expected(manifest_line_uri(str(path), n), code, why)  # noqa: E731
    expired = _expired("aws")
    first = Expected(file_uri(str(img["m-json-1"])), ANSWERED, "a good row")
    return _lines(
        path,
        [
            (json.dumps({"path": str(img["m-json-1"]), "camera": 1}).encode(), first),
            (b"   ", None),  # 2: blank
            (b"{not json", line(3, "local.manifest", "not JSON")),
            (b'["a", "list"]', line(4, "local.manifest", "a JSON list, not an object")),
            (json.dumps({"url": 12345}).encode(), line(5, "local.manifest", "a number as url")),
            (json.dumps({"url": None, "camera": 2}).encode(), line(6, "local.manifest", "a null url")),
            (
                json.dumps({"url": expired}).encode(),
                Expected(expired.split("?", 1)[0], "local.urlExpired", "an AWS signature expired in 2020"),
            ),
            (
                json.dumps({"url": "https://h.example/" + "x" * 3000}).encode(),
                line(8, "local.urlTooLong", "3 KB"),
            ),
            (
                json.dumps({"path": str(img["m-json-2"]), "note": "n" * _BIG_FIELD}).encode(),
                line(9, "local.manifest", "a 5 MB metadata field"),
            ),
            (
                json.dumps({"url": "ftp://h.example/a.jpg"}).encode(),
                line(10, "local.manifest", "an unknown scheme"),
            ),
            (b"\xb3\xb5\xc5\xc6", line(11, "local.manifest", "bytes that are not UTF-8")),
            (json.dumps({"path": str(img["m-json-1"])}).encode(), None),  # 12: line 1's image again
        ],
    )


def _write_txt(path: Path, img: dict[str, Path]) -> list[Expected]:
    line = lambda n, code, why: Expected(manifest_line_uri(str(path), n), code, why)  # noqa: E731
    return _lines(
        path,
        [
            (b"# a comment", None),
            (
                str(img["m-txt-1"]).encode(),
                Expected(file_uri(str(img["m-txt-1"])), ANSWERED, "an absolute path"),
            ),
            (b"", None),
            (b"\xb3\xb5\xc5\xc6.img", line(4, "local.manifest", "a line that is not UTF-8")),
            (b"gopher://old.example/a.jpg", line(5, "local.manifest", "an unknown scheme")),
            (
                f"manifest://{path}#4".encode(),
                line(6, "local.manifest", "a manifest line URI listed by hand"),
            ),
            (str(img["m-txt-1"]).encode(), None),  # 7: the same image again
        ],
    )


# -- all of it ---------------------------------------------------------------------------------------


def write_bad_corpus(folder: Path, *, archives: bool = True, manifests: bool = True) -> BadCorpus:
    """Write the corpus under ``folder`` (created; should be empty) and return what each source
    must give. ``archives``/``manifests``: also write ``bad.tar``, ``bad.tar.gz``, ``bad.zip`` /
    ``bad.csv``, ``bad.jsonl``, ``bad.txt`` (with the ``.img`` pictures they name)."""
    folder = Path(os.path.abspath(folder))
    folder.mkdir(parents=True, exist_ok=True)
    corpus = BadCorpus(folder)
    corpus.sources.append(str(folder))
    corpus.expected[str(folder)] = _write_folder(folder)
    if archives:
        for name, compress in (("bad.tar", False), ("bad.tar.gz", True)):
            path = folder / name
            data, listed = _tar_bytes(compress)
            path.write_bytes(data)
            items = [
                Expected(archive_uri("tar", str(path), n, _nth(listed, k)), o, w)
                for k, (n, o, w) in enumerate(listed)
            ]
            # Listing cannot step over 5 GB that are not there: one row for the archive's damage.
            items.append(Expected(file_uri(str(path)), "local.archive", "the archive ends inside a member"))
            corpus.sources.append(str(path))
            corpus.expected[str(path)] = items
        path = folder / "bad.zip"
        data, listed = _zip_bytes()
        path.write_bytes(data)
        corpus.sources.append(str(path))
        corpus.expected[str(path)] = [
            Expected(archive_uri("zip", str(path), n, _nth(listed, k)), o, w)
            for k, (n, o, w) in enumerate(listed)
        ]
    if manifests:
        img = _manifest_images(folder)
        for name, write in (("bad.csv", _write_csv), ("bad.jsonl", _write_jsonl), ("bad.txt", _write_txt)):
            path = folder / name
            corpus.sources.append(str(path))
            corpus.expected[str(path)] = write(path, img)
    return corpus


def _nth(listed: list[tuple[str, str, str]], k: int) -> int:
    """Which occurrence of its name entry ``k`` is (1 for the first)."""
    return 1 + sum(1 for name, _, _ in listed[:k] if name == listed[k][0])
