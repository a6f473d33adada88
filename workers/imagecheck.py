"""Local image pre-checks: refuse what RecognizeCarNumber would refuse, before a call is spent.

The rules are the product page's: PNG, JPG/JPEG, BMP, GIF, TIFF or WebP (recognised by their
magic bytes, never by file name; PDF and everything else refused); at most 10 MiB; width and
height each > 15 and < 8192 px; long side / short side < 50; a URL of at most 2048 bytes.

:func:`check_image` reads only the header (Pillow's plugin parses it without decoding pixels) and
catches truncation by a cheap structural look at the end of the file (JPEG EOI after the first
scan, PNG IEND, GIF trailer, BMP/WebP declared sizes, TIFF strip extents). Cost: microseconds,
no pixel decode. It raises :class:`~workers.errors.ImageRejected` with a ``local.*`` code;
:data:`API_EQUIVALENT` maps each code to the (HTTP status, Code) the real service would answer.

Decisions (edge cases the product page leaves open):

* CMYK JPEG: accepted (a valid JPEG; ``mode`` reports ``CMYK``). :func:`maybe_reencode` turns it
  into RGB when it re-encodes.
* 16-bit PNG: accepted (a valid PNG; ``mode`` reports Pillow's ``I;16``/``I``/``RGB``).
* Animated GIF: accepted; the service reads the first frame. ``frames`` reports the count.
* Exactly 15 px: refused (must be > 15). Exactly 8192 px: refused (must be < 8192).
* Aspect exactly 50: refused (long / short must be < 50; compared in integers, no rounding).
* Exactly 10 MiB (10 * 1024 * 1024 bytes) is accepted; one byte more is refused.

:func:`check_parts` runs the same rules over the first and last few KB of an object whose full
size is known (``Url`` mode: a ranged read of the head and of the tail instead of the whole
picture). It answers exactly what :func:`check_image` would answer for the whole file, or
``None`` when the parts cannot tell (a header longer than the head read, an EOI or IEND not in
the tail, a TIFF directory past the head, any WebP: Pillow's WebP reader takes the whole file):
the caller then reads more, up to the whole file.

Pixel-count "decompression bomb" protection is not needed here: pixels are never decoded, and
every image Pillow would call a bomb is already wider or taller than 8191 px.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageFile,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from workers.errors import ImageRejected

__all__ = [
    "API_EQUIVALENT",
    "FORMATS",
    "HEAD_BYTES",
    "MAX_ASPECT",
    "MAX_BYTES",
    "MAX_SIDE_PX",
    "MAX_URL_BYTES",
    "MIN_SIDE_PX",
    "REENCODE_TARGET_BYTES",
    "TAIL_BYTES",
    "ImageInfo",
    "check_image",
    "check_parts",
    "check_url",
    "maybe_reencode",
    "sniff_format",
]

MAX_BYTES = 10 * 1024 * 1024  # inclusive
MIN_SIDE_PX = 15  # exclusive: a side must be > 15
MAX_SIDE_PX = 8192  # exclusive: a side must be < 8192
MAX_ASPECT = 50  # exclusive: long / short must be < 50
MAX_URL_BYTES = 2048  # inclusive, UTF-8 bytes
REENCODE_TARGET_BYTES = 1_500_000  # the docs advise < 1.5 MB
# Ranged reads for check_parts: enough for the header of a plain JPEG/PNG/GIF/BMP/WebP and the
# end-of-file markers; a longer header (big EXIF, ICC profiles) makes the caller read more.
HEAD_BYTES = 8 * 1024
TAIL_BYTES = 2 * 1024

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")

# local code -> what the real service answers for the same input: (HTTP status, Code)
API_EQUIVALENT: dict[str, tuple[int, str]] = {
    "local.emptyImage": (415, "unsupportedImageFormat"),
    "local.unsupportedFormat": (415, "unsupportedImageFormat"),
    "local.truncatedImage": (415, "unsupportedImageFormat"),
    "local.corruptImage": (415, "unsupportedImageFormat"),
    "local.imageTooLarge": (413, "exceededImageContent"),
    "local.imageTooSmall": (416, "illegalImageSize"),
    "local.imageDimensionTooLarge": (416, "illegalImageSize"),
    "local.aspectRatio": (416, "illegalImageSize"),
    "local.urlTooLong": (400, "exceededImageUrlLength"),
    "local.illegalUrl": (400, "illegalImageUrl"),
}

_PLUGINS: dict[str, type[ImageFile.ImageFile]] = {
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "GIF": GifImagePlugin.GifImageFile,
    "BMP": BmpImagePlugin.BmpImageFile,
    "TIFF": TiffImagePlugin.TiffImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
}


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the header says: ``format`` (one of :data:`FORMATS`), ``width``/``height`` in px,
    ``frames`` (> 1 for animated GIF/WebP, multi-page TIFF) and Pillow's ``mode`` (``RGB``,
    ``CMYK``, ``I;16``...)."""

    format: str
    width: int
    height: int
    frames: int
    mode: str


def sniff_format(data: bytes) -> str | None:
    """The format named by the magic bytes at the start of ``data``, or None (PDF included)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"BM") and len(data) >= 18:
        return "BMP"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _describe(data: bytes) -> str:
    if data.startswith(b"%PDF"):
        return "a PDF"
    if data.startswith((b"II+\x00", b"MM\x00+")):
        return "a BigTIFF"
    head = data[:8].hex(" ")
    return f"not a recognised image (starts {head})"


def check_image(data: bytes) -> ImageInfo:
    """Check ``data`` against the service's rules without decoding pixels.

    Returns the :class:`ImageInfo`. Raises :class:`ImageRejected` with ``local.emptyImage``,
    ``local.imageTooLarge`` (bytes), ``local.unsupportedFormat``, ``local.corruptImage`` (the
    header does not parse), ``local.truncatedImage``, ``local.imageTooSmall``,
    ``local.imageDimensionTooLarge`` (px) or ``local.aspectRatio``.
    """
    info = _check(data, data, len(data))
    assert info is not None  # the whole file always decides
    return info


def check_parts(head: bytes, tail: bytes, size: int) -> ImageInfo | None:
    """Check an image of ``size`` bytes from its first bytes ``head`` and its last bytes ``tail``
    (``tail`` ends at byte ``size``; the two may overlap). Same rules, codes and raises as
    :func:`check_image`; returns ``None`` when these parts cannot decide (read more). With the
    whole file in ``head`` this *is* :func:`check_image`. ``frames`` is 0 (not counted) unless
    the whole file was given: counting GIF frames walks the whole file.
    """
    if len(head) >= size:
        return check_image(head[:size])
    if size < 0 or len(tail) > size:
        raise ValueError(f"head/tail do not fit an object of {size} bytes")
    return _check(head, tail, size)


def _check(head: bytes, tail: bytes, size: int) -> ImageInfo | None:
    whole = len(head) >= size
    if size == 0:
        raise ImageRejected("local.emptyImage", "image is 0 bytes")
    if size > MAX_BYTES:
        raise ImageRejected(
            "local.imageTooLarge", f"image is {size} bytes; the API allows at most {MAX_BYTES}"
        )
    fmt = sniff_format(head)
    if fmt is None:
        raise ImageRejected(
            "local.unsupportedFormat",
            f"{_describe(head)}; accepted: PNG, JPEG, BMP, GIF, TIFF, WebP",
        )
    try:
        im = _PLUGINS[fmt](io.BytesIO(head))
    except Exception as exc:  # untrusted bytes: any parse failure is a refusal, not a crash
        if not whole:
            return None  # the header may go on past the head read
        short = size < 64 or isinstance(exc, EOFError | struct.error | IndexError)
        code = "local.truncatedImage" if short else "local.corruptImage"
        raise ImageRejected(code, f"{fmt} header does not parse ({type(exc).__name__})") from None
    try:
        width, height = im.size
        mode = im.mode
        frames = int(getattr(im, "n_frames", 1) or 1) if whole else 0
        truncated = _truncated(fmt, head, tail, size, im)
        if truncated:
            raise ImageRejected("local.truncatedImage", f"{fmt} data ends early ({size} bytes)")
    except ImageRejected:
        raise
    except Exception as exc:
        if not whole:
            return None
        raise ImageRejected(
            "local.corruptImage", f"{fmt} structure does not parse ({type(exc).__name__})"
        ) from None
    finally:
        im.close()
    if truncated is None:
        return None
    _check_dimensions(width, height)
    return ImageInfo(format=fmt, width=width, height=height, frames=frames, mode=mode)


def _check_dimensions(width: int, height: int) -> None:
    short, long = sorted((width, height))
    if short <= MIN_SIDE_PX:
        raise ImageRejected("local.imageTooSmall", f"{width}x{height} px; each side must be > {MIN_SIDE_PX}")
    if long >= MAX_SIDE_PX:
        raise ImageRejected(
            "local.imageDimensionTooLarge",
            f"{width}x{height} px; each side must be < {MAX_SIDE_PX}",
        )
    if long >= MAX_ASPECT * short:
        raise ImageRejected(
            "local.aspectRatio",
            f"{width}x{height} px; long side / short side must be < {MAX_ASPECT}",
        )


def _truncated(fmt: str, head: bytes, tail: bytes, size: int, im: ImageFile.ImageFile) -> bool | None:
    """A structural end-of-file check per format from the head (parsed into ``im``), the tail
    (the last ``len(tail)`` of ``size`` bytes) and the size: O(1) or one backwards scan of the
    tail, no decode. ``None``: the tail does not reach far enough back to tell."""
    offset = size - len(tail)  # where the tail starts in the file
    if fmt == "JPEG":
        # Entropy-coded data stuffs every 0xFF with 0x00, so FF D9 after the first scan's start
        # can only be the EOI marker. Trailing padding after EOI is allowed.
        scan_start = im.tile[0][2] if im.tile else 2
        found = tail.rfind(b"\xff\xd9")
        if found >= 0 and offset + found >= scan_start:
            return False
        return True if offset <= scan_start else None
    if fmt == "PNG":
        if tail.rfind(b"IEND\xaeB`\x82") >= 0:
            return False
        return True if offset == 0 else None
    if fmt == "GIF":
        # The last data sub-block ends with a 0x00 terminator, then the 0x3B trailer; a stray
        # ';' at a random cut point (1 in 256) must not pass for the end of the file.
        end = tail.rstrip(b"\x00")
        if offset > 0 and len(end) < 2:
            return None
        return not end.endswith(b"\x00;")
    if fmt == "BMP":
        declared = struct.unpack_from("<I", head, 2)[0]
        if declared >= size:
            return declared > size
        return any(_tile_end(t) > size for t in im.tile)
    if fmt == "WEBP":
        return struct.unpack_from("<I", head, 4)[0] + 8 > size
    if fmt == "TIFF":
        return _tiff_truncated(size, im)
    return False


def _tile_end(tile: ImageFile._Tile) -> int:
    # Uncompressed raw tiles only: offset + rows * stride. Other decoders: trust the offset.
    if tile[0] != "raw":
        return int(tile[2])
    x0, y0, x1, y1 = tile[1]
    args = tile[3]
    rawmode = args[0] if isinstance(args, tuple) else args
    stride = args[1] if isinstance(args, tuple) and len(args) > 1 and args[1] else 0
    if not stride:
        bits = {"1": 1, "P": 8, "L": 8}.get(rawmode, 8 * max(1, len(rawmode.rstrip(";0123456789"))))
        stride = ((x1 - x0) * bits + 31) // 32 * 4
    return int(tile[2]) + abs(stride) * (y1 - y0)


def _tiff_truncated(size: int, im: ImageFile.ImageFile) -> bool:
    tags = getattr(im, "tag_v2", {})
    offsets = tags.get(273) or tags.get(324)  # StripOffsets / TileOffsets
    counts = tags.get(279) or tags.get(325)  # StripByteCounts / TileByteCounts
    if not offsets or not counts:
        return False
    if isinstance(offsets, int):
        offsets = (offsets,)
    if isinstance(counts, int):
        counts = (counts,)
    return any(o + c > size for o, c in zip(offsets, counts, strict=False))


def check_url(url: str) -> None:
    """Refuse a URL the service would refuse: longer than 2048 UTF-8 bytes (``local.urlTooLong``)
    or not plain http(s) (``local.illegalUrl``). The message never repeats the URL."""
    if not url.lower().startswith(("http://", "https://")):
        raise ImageRejected("local.illegalUrl", "image URL must start with http:// or https://")
    size = len(url.encode("utf-8"))
    if size > MAX_URL_BYTES:
        raise ImageRejected(
            "local.urlTooLong", f"URL is {size} bytes; the API allows at most {MAX_URL_BYTES}"
        )


def maybe_reencode(
    data: bytes, info: ImageInfo, threshold: int | None, target_bytes: int = REENCODE_TARGET_BYTES
) -> bytes:
    """``data`` unchanged when ``threshold`` is None or ``len(data) <= threshold``; otherwise the
    first frame, turned upright by its EXIF orientation, re-encoded as RGB JPEG, lowering quality
    (90 → 60) and then scaling down by 3/4 steps (never below 16 px a side) until it fits
    ``target_bytes``. Returns the smaller of the original and the best attempt, so it never makes
    an image bigger. Raises what Pillow raises for pixels that do not decode (``OSError``...): the
    resolver makes that the image's ``local.decode`` row.
    """
    if threshold is None or len(data) <= threshold:
        return data
    with Image.open(io.BytesIO(data), formats=[info.format]) as im:
        im.seek(0)
        # The EXIF orientation goes with the metadata a JPEG re-encode drops: apply it to the
        # pixels, or a camera's rotated frame reaches the service on its side.
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    best = data
    while True:
        for quality in (90, 80, 70, 60):
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=quality, optimize=True)
            out = buf.getvalue()
            if len(out) < len(best):
                best = out
            if len(out) <= target_bytes:
                return out
        w, h = rgb.size
        nw, nh = w * 3 // 4, h * 3 // 4
        if min(nw, nh) <= MIN_SIDE_PX:
            return best
        rgb = rgb.resize((nw, nh), Image.Resampling.LANCZOS)
