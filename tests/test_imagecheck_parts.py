"""check_parts: the head and tail of an object decide exactly as the whole file would, or say
they cannot (None)."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from workers.errors import ImageRejected
from workers.imagecheck import HEAD_BYTES, TAIL_BYTES, ImageInfo, check_image, check_parts


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int) -> Image.Image:
    return Image.frombytes("RGB", (w, h), os.urandom(w * h * 3))


def outcome(fn, *args) -> tuple[str, ...] | None:  # type: ignore[no-untyped-def]
    try:
        info = fn(*args)
    except ImageRejected as exc:
        return ("rejected", exc.code)
    if info is None:
        return None
    assert isinstance(info, ImageInfo)
    return ("ok", info.format, str(info.width), str(info.height), info.mode)


def corpus() -> dict[str, bytes]:
    big = noise(640, 480)
    out: dict[str, bytes] = {}
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"):
        data = encode(big, fmt)
        out[fmt] = data
        out[f"{fmt}-cut"] = data[: len(data) * 2 // 3]
    jpeg = out["JPEG"]
    out["JPEG-padded"] = jpeg + b"\x00" * 5000  # padding after EOI: fine, but not in the tail
    out["JPEG-exif"] = encode(big, "JPEG", exif=b"Exif\x00\x00" + b"\x00" * 30_000)
    out["JPEG-progressive-cut"] = encode(big, "JPEG", progressive=True)[:-100]
    out["PNG-tiny"] = encode(noise(10, 10), "PNG")
    out["PNG-aspect-52"] = encode(noise(1040, 20), "PNG")
    out["PNG-520x10"] = encode(noise(520, 10), "PNG")
    out["PDF"] = b"%PDF-1.4\n" + b"0" * 20_000
    out["text"] = b"hello, this is not a picture\n" * 1000
    return out


@pytest.mark.parametrize("name", sorted(corpus()))
@pytest.mark.parametrize("head,tail", [(HEAD_BYTES, TAIL_BYTES), (64, 16), (1024, 3), (10**9, 10)])
def test_parts_agree_with_the_whole_file_or_say_they_cannot(name: str, head: int, tail: int) -> None:
    data = corpus_cache[name]
    whole = outcome(check_image, data)
    parts = outcome(check_parts, data[:head], data[max(0, len(data) - tail) :], len(data))
    assert parts is None or parts == whole, (name, parts, whole)
    if head >= len(data):
        assert parts == whole


corpus_cache = corpus()


def test_default_reads_decide_the_common_cases() -> None:
    def parts(name: str) -> tuple[str, ...] | None:
        data = corpus_cache[name]
        return outcome(check_parts, data[:HEAD_BYTES], data[-TAIL_BYTES:], len(data))

    for fmt in ("JPEG", "PNG", "GIF", "BMP"):
        assert parts(fmt) == outcome(check_image, corpus_cache[fmt]), fmt
        assert parts(fmt)[:4] == ("ok", fmt, "640", "480"), fmt  # type: ignore[index]
    # A cut file has no end marker in its tail, which a padded one may not have either: read all.
    assert parts("JPEG-cut") is None and parts("PNG-cut") is None
    assert parts("PNG-tiny") == ("rejected", "local.imageTooSmall")
    assert parts("PNG-aspect-52") == ("rejected", "local.aspectRatio")
    assert parts("PNG-520x10") == ("rejected", "local.imageTooSmall")
    assert parts("PDF") == ("rejected", "local.unsupportedFormat")
    assert parts("text") == ("rejected", "local.unsupportedFormat")
    assert parts("JPEG-padded") is None  # EOI before the tail: read more
    assert parts("JPEG-exif") is None  # header longer than the head read
    assert parts("WEBP") is None  # Pillow's WebP reader wants the whole file


def test_sizes_from_the_listing_decide_without_bytes() -> None:
    with pytest.raises(ImageRejected, match="emptyImage"):
        check_parts(b"", b"", 0)
    with pytest.raises(ImageRejected, match="imageTooLarge"):
        check_parts(corpus_cache["PNG"][:64], b"", 10 * 1024 * 1024 + 1)
    info = check_parts(corpus_cache["GIF"], b"", len(corpus_cache["GIF"]))
    assert info is not None and info.frames == 1  # the whole file: frames counted
