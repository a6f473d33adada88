"""Ground truth carried inside an image, for the replay recognizer and for tests.

A test image can carry the plates it shows, so the local server answers exactly what the test
expects without any model. The truth is a JSON list of plates::

    [{"text": "浙A12345", "type": "小型汽车", "polygon": [[x, y], ...4], "prob": 0.99}]

stored under the keyword ``carnumber-truth``:

* PNG: a ``tEXt`` chunk (keyword ``carnumber-truth``) right after ``IHDR``;
* JPEG: a ``COM`` segment right after ``SOI`` whose text is ``carnumber-truth:`` + JSON.

The JSON is written with ASCII escapes (``\\u6d59``), because ``tEXt`` is Latin-1 only.
:func:`read_truth` scans chunk/segment headers only (no pixel decode): microseconds per image.
:func:`make_test_image` draws a plate-like picture with Pillow and embeds its truth; a 320x240
PNG takes about a millisecond, so tests and load runs can make thousands.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ocrserver.recognizers.base import PLATE_TYPES, DetectedPlate

__all__ = [
    "TRUTH_KEY",
    "PlateLike",
    "distinct_copy",
    "embed_truth",
    "make_test_image",
    "plate_from_json",
    "plate_to_json",
    "read_truth",
    "write_test_archive",
]

TRUTH_KEY = "carnumber-truth"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_JPEG_COM_PREFIX = TRUTH_KEY.encode("ascii") + b":"
DEFAULT_TYPE = PLATE_TYPES[1]  # 小型汽车
DEFAULT_PROB = 0.99
DEFAULT_TYPE_PROB = 0.95

# A plate as callers like to write it: the text alone, a JSON-style mapping, or a DetectedPlate.
PlateLike = str | Mapping[str, Any] | DetectedPlate


def plate_to_json(plate: DetectedPlate) -> dict[str, Any]:
    """The truth-file form of one plate."""
    return {
        "text": plate.text,
        "type": plate.plate_type,
        "polygon": [list(p) for p in plate.polygon],
        "prob": plate.prob,
        "type_prob": plate.type_prob,
    }


def plate_from_json(item: Mapping[str, Any], default_box: tuple[int, int, int, int] | None = None
                    ) -> DetectedPlate:
    """A :class:`DetectedPlate` from a truth entry; missing fields get defaults.

    ``default_box`` (x0, y0, x1, y1, pixels) is used when the entry has no polygon.
    Raises ``ValueError`` when ``text`` is missing or the polygon is not four points.
    """
    text = item.get("text")
    if not isinstance(text, str) or not text:
        raise ValueError("truth plate needs a non-empty 'text'")
    poly = item.get("polygon")
    if poly is None:
        x0, y0, x1, y1 = default_box or (0, 0, 0, 0)
        points = ((x0, y0), (x1, y0), (x1, y1), (x0, y1))
    else:
        if len(poly) != 4:
            raise ValueError("truth polygon needs four [x, y] points")
        p = [(round(float(pt[0])), round(float(pt[1]))) for pt in poly]
        points = (p[0], p[1], p[2], p[3])
    return DetectedPlate(
        text=text,
        prob=float(item.get("prob", DEFAULT_PROB)),
        plate_type=str(item.get("type") or DEFAULT_TYPE),
        type_prob=float(item.get("type_prob", DEFAULT_TYPE_PROB)),
        polygon=points,
    )


def _to_plate(p: PlateLike) -> DetectedPlate:
    if isinstance(p, DetectedPlate):
        return p
    if isinstance(p, str):
        return plate_from_json({"text": p})
    return plate_from_json(p)


def _truth_json(plates: Iterable[PlateLike]) -> bytes:
    doc = [plate_to_json(_to_plate(p)) for p in plates]
    return json.dumps(doc, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_chunks(data: bytes) -> Iterable[tuple[int, int, bytes, bytes]]:
    """(start, end, type, payload) for each chunk; stops quietly at a truncated one."""
    pos = len(_PNG_SIG)
    while pos + 8 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            return
        yield pos, end, kind, data[pos + 8 : pos + 8 + length]
        if kind == b"IEND":
            return
        pos = end


def _jpeg_segments(data: bytes) -> Iterable[tuple[int, int, int, bytes]]:
    """(start, end, marker, payload) for each header segment, up to the first scan (SOS)."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if end > len(data):
            return
        yield pos, end, marker, data[pos + 4 : end]
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return
        pos = end


def embed_truth(image_bytes: bytes, plates: Iterable[PlateLike]) -> bytes:
    """``image_bytes`` (PNG or JPEG) with ``plates`` stored as its truth, replacing any earlier one.

    Raises ``ValueError`` for other formats or a truth too long for one JPEG segment (64 KiB).
    """
    payload = _truth_json(plates)
    if image_bytes.startswith(_PNG_SIG):
        keep = [
            image_bytes[s:e]
            for s, e, kind, body in _png_chunks(image_bytes)
            if not (kind == b"tEXt" and body.startswith(TRUTH_KEY.encode("ascii") + b"\0"))
        ]
        if not keep or not keep[0][4:8] == b"IHDR":
            raise ValueError("PNG does not start with an IHDR chunk")
        text = _png_chunk(b"tEXt", TRUTH_KEY.encode("ascii") + b"\0" + payload)
        return _PNG_SIG + keep[0] + text + b"".join(keep[1:])
    if image_bytes.startswith(b"\xff\xd8"):
        body = _JPEG_COM_PREFIX + payload
        if len(body) + 2 > 0xFFFF:
            raise ValueError("truth is too long for one JPEG COM segment")
        rest = image_bytes[2:]
        for s, e, marker, seg in _jpeg_segments(image_bytes):
            if marker == 0xFE and seg.startswith(_JPEG_COM_PREFIX):
                rest = image_bytes[2:s] + image_bytes[e:]
                break
        return b"\xff\xd8" + b"\xff\xfe" + struct.pack(">H", len(body) + 2) + body + rest
    raise ValueError("embed_truth supports PNG and JPEG only")


def distinct_copy(image_bytes: bytes, n: int) -> bytes:
    """The same picture (same pixels, same truth) with different bytes: a PNG gets a private
    ancillary ``cnId`` chunk before ``IEND``, a JPEG a comment after ``SOI``, holding ``n``.
    Benchmarks and drills use it to make many distinct pictures cheaply (copies of one picture
    would be called once: the pipeline deduplicates by content)."""
    tag = f"copy {n}".encode("ascii")
    if image_bytes.startswith(_PNG_SIG):
        end = image_bytes.rindex(b"IEND") - 4  # the IEND chunk's length field
        return image_bytes[:end] + _png_chunk(b"cnId", tag) + image_bytes[end:]
    if image_bytes.startswith(b"\xff\xd8"):
        return image_bytes[:2] + b"\xff\xfe" + struct.pack(">H", len(tag) + 2) + tag + image_bytes[2:]
    raise ValueError("distinct_copy: not a PNG or JPEG")


def read_truth(image_bytes: bytes) -> list[DetectedPlate] | None:
    """The plates embedded in a PNG or JPEG, ``[]`` for an embedded "no plate", ``None`` when the
    image carries no (readable) truth."""
    raw: bytes | None = None
    if image_bytes.startswith(_PNG_SIG):
        prefix = TRUTH_KEY.encode("ascii") + b"\0"
        for _, _, kind, body in _png_chunks(image_bytes):
            if kind == b"tEXt" and body.startswith(prefix):
                raw = body[len(prefix) :]
                break
            if kind == b"IDAT":  # we write truth before the pixels; stop scanning there
                break
    elif image_bytes.startswith(b"\xff\xd8"):
        for _, _, marker, seg in _jpeg_segments(image_bytes):
            if marker == 0xFE and seg.startswith(_JPEG_COM_PREFIX):
                raw = seg[len(_JPEG_COM_PREFIX) :]
                break
    if raw is None:
        return None
    try:
        doc = json.loads(raw.decode("latin-1"))
        return [plate_from_json(item) for item in doc]
    except (ValueError, TypeError, AttributeError):
        return None


_FONT_CACHE: dict[int, ImageFont.FreeTypeFont | ImageFont.ImageFont] = {}


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    font = _FONT_CACHE.get(size)
    if font is None:
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1
            font = ImageFont.load_default()
        _FONT_CACHE[size] = font
    return font


def _layout(n: int, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Plate boxes (x0, y0, x1, y1) stacked down the image, each about 44% wide, 3.2:1."""
    pw = max(8, int(width * 0.44))
    ph = max(4, int(pw / 3.2))
    gap = max(2, ph // 3)
    total = n * ph + (n - 1) * gap
    y = max(0, (height - total) // 2)
    x0 = (width - pw) // 2
    boxes = []
    for _ in range(n):
        boxes.append((x0, y, x0 + pw, min(height - 1, y + ph)))
        y += ph + gap
    return boxes


def make_test_image(
    plates: Sequence[PlateLike],
    width: int = 320,
    height: int = 240,
    fmt: str = "png",
) -> bytes:
    """A ``width`` x ``height`` picture with one blue plate per entry, truth embedded.

    Plates without a polygon are laid out down the image and get their drawn box as polygon.
    ``fmt`` is ``"png"`` or ``"jpeg"``. Only the ASCII part of each text is drawn (the default
    font has no CJK glyphs); the embedded truth has the full text.
    """
    fmt = fmt.lower()
    if fmt not in ("png", "jpeg", "jpg"):
        raise ValueError(f"fmt must be 'png' or 'jpeg', not {fmt!r}")
    boxes = _layout(len(plates), width, height) if plates else []
    resolved: list[DetectedPlate] = []
    for p, box in zip(plates, boxes, strict=True):
        if isinstance(p, str):
            resolved.append(plate_from_json({"text": p}, box))
        elif isinstance(p, DetectedPlate):
            resolved.append(p)
        else:
            resolved.append(plate_from_json(p, box))
    img = Image.new("RGB", (width, height), (118, 122, 128))
    draw = ImageDraw.Draw(img)
    for plate in resolved:
        xs = [pt[0] for pt in plate.polygon]
        ys = [pt[1] for pt in plate.polygon]
        x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
        if x1 - x0 < 4 or y1 - y0 < 4:
            continue
        draw.rectangle((x0, y0, x1, y1), fill=(20, 60, 170), outline=(235, 235, 235), width=2)
        text = "".join(c for c in plate.text if c.isascii())
        size = max(6, int((y1 - y0) * 0.6))
        draw.text((x0 + (x1 - x0) // 10, y0 + (y1 - y0) // 5), text, fill=(245, 245, 245),
                  font=_font(size))
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        img.save(buf, format="JPEG", quality=85)
    return embed_truth(buf.getvalue(), resolved)


def write_test_archive(folder: Path, n: int, distinct: int = 200) -> None:
    """``n`` PNG files over ``distinct`` rendered pictures (one plate, two every 10th, none every
    25th), each file with bytes of its own (:func:`distinct_copy`: copies of one picture would be
    called once), for drills and benchmarks; the replay recognizer reads each file's truth."""
    folder.mkdir(parents=True, exist_ok=True)
    distinct = max(1, min(distinct, n))
    pool: list[bytes] = []
    for i in range(distinct):
        if i % 25 == 24:
            plates: list[dict[str, str]] = []
        elif i % 10 == 9:
            plates = [{"text": f"苏E{i:05d}"}, {"text": f"浙A{i:05d}"}]
        else:
            plates = [{"text": f"苏E{i:05d}", "type": "小型汽车"}]
        pool.append(distinct_copy(make_test_image(plates), -1 - i))  # the plate-less ones too
        (folder / f"pool-{i:04d}.png").write_bytes(pool[-1])
    for i in range(n - distinct):
        (folder / f"img-{i:07d}.png").write_bytes(distinct_copy(pool[i % distinct], i))
