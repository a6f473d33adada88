"""Local image pre-checks: the bad-input corpus (generated here) gets the documented outcome."""

from __future__ import annotations

import io
import os
import struct
import zlib

import pytest
from PIL import Image

from workers.errors import ImageRejected
from workers.imagecheck import (
    API_EQUIVALENT,
    MAX_BYTES,
    check_image,
    check_url,
    maybe_reencode,
    sniff_format,
)


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, mode: str = "RGB") -> Image.Image:
    return Image.frombytes("RGB", (w, h), os.urandom(w * h * 3)).convert(mode)


def rejected(data: bytes) -> str:
    with pytest.raises(ImageRejected) as info:
        check_image(data)
    assert info.value.code in API_EQUIVALENT  # every local code maps to the service's answer
    return info.value.code


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_every_supported_format_is_read_from_its_header(fmt: str) -> None:
    info = check_image(encode(noise(120, 40), fmt))
    assert (info.format, info.width, info.height, info.frames) == (fmt, 120, 40, 1)


def test_format_comes_from_magic_bytes_not_the_name() -> None:
    png = encode(noise(40, 40), "PNG")
    assert sniff_format(png) == "PNG"
    assert check_image(png).format == "PNG"  # whatever the file was called
    assert sniff_format(b"%PDF-1.7\n") is None


def test_zero_bytes() -> None:
    assert rejected(b"") == "local.emptyImage"


def test_pdf_renamed_jpg_is_refused_as_unsupported() -> None:
    pdf = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
    with pytest.raises(ImageRejected) as info:
        check_image(pdf)
    assert info.value.code == "local.unsupportedFormat"
    assert "PDF" in info.value.message
    assert API_EQUIVALENT["local.unsupportedFormat"] == (415, "unsupportedImageFormat")


def test_truncated_jpeg_is_caught_without_decoding() -> None:
    data = encode(noise(640, 480), "JPEG", quality=90)
    assert rejected(data[: len(data) // 2]) == "local.truncatedImage"
    # progressive JPEG: several scans, the end marker still must come after the first one
    prog = encode(noise(320, 240), "JPEG", progressive=True)
    assert rejected(prog[: len(prog) - 100]) == "local.truncatedImage"
    # padding after the end marker is fine (cameras do that)
    assert check_image(data + b"\x00" * 1000).width == 640


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_truncation_of_other_formats(fmt: str) -> None:
    data = encode(noise(200, 100), fmt)
    assert rejected(data[: len(data) * 2 // 3]) in ("local.truncatedImage", "local.corruptImage")


def test_size_limit_is_ten_mebibytes_inclusive() -> None:
    jpeg = encode(noise(64, 64), "JPEG")
    exact = jpeg + b"\x00" * (MAX_BYTES - len(jpeg))
    assert len(exact) == 10 * 1024 * 1024
    assert check_image(exact).format == "JPEG"
    assert rejected(exact + b"\x00") == "local.imageTooLarge"
    assert API_EQUIVALENT["local.imageTooLarge"] == (413, "exceededImageContent")


def test_fifteen_px_is_refused_sixteen_accepted() -> None:
    assert rejected(encode(Image.new("L", (15, 100)), "PNG")) == "local.imageTooSmall"
    assert rejected(encode(Image.new("L", (100, 15)), "PNG")) == "local.imageTooSmall"
    assert check_image(encode(Image.new("L", (16, 100)), "PNG")).width == 16


def test_8192_px_is_refused_8191_accepted() -> None:
    assert rejected(encode(Image.new("1", (8192, 200)), "PNG")) == "local.imageDimensionTooLarge"
    assert rejected(encode(Image.new("1", (200, 8192)), "PNG")) == "local.imageDimensionTooLarge"
    assert check_image(encode(Image.new("1", (8191, 200)), "PNG")).width == 8191
    assert API_EQUIVALENT["local.imageDimensionTooLarge"] == (416, "illegalImageSize")


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_header_claiming_a_huge_image_is_refused_not_decoded() -> None:
    # A well-formed PNG whose header says 40000 x 40000 (a decompression bomb if decoded):
    # refused by its size from the header alone, in well under a second.
    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 100))
        + png_chunk(b"IEND", b"")
    )
    assert rejected(data) == "local.imageDimensionTooLarge"


def test_aspect_exactly_50_is_refused_just_under_accepted() -> None:
    assert rejected(encode(Image.new("L", (1000, 20)), "PNG")) == "local.aspectRatio"
    assert rejected(encode(Image.new("L", (20, 1000)), "PNG")) == "local.aspectRatio"
    assert check_image(encode(Image.new("L", (999, 20)), "PNG")).width == 999
    assert API_EQUIVALENT["local.aspectRatio"] == (416, "illegalImageSize")


def test_cmyk_jpeg_is_accepted_and_reported() -> None:
    info = check_image(encode(noise(100, 60, "CMYK"), "JPEG"))
    assert (info.format, info.mode) == ("JPEG", "CMYK")


def test_16_bit_png_is_accepted() -> None:
    im = Image.frombytes("I;16", (64, 32), os.urandom(64 * 32 * 2))
    data = encode(im, "PNG")
    assert data[24] == 16  # IHDR bit depth: really 16-bit
    info = check_image(data)
    assert info.format == "PNG" and info.mode.startswith("I")


def test_animated_gif_is_accepted_with_its_frame_count() -> None:
    frames = [Image.new("RGB", (50, 40), (i * 60, 0, 0)) for i in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    info = check_image(buf.getvalue())
    assert (info.format, info.frames) == ("GIF", 4)


def test_random_bytes_and_bigtiff_are_unsupported() -> None:
    assert rejected(os.urandom(2000).replace(b"\xff", b"\x00")) == "local.unsupportedFormat"
    assert rejected(b"II+\x00" + b"\x00" * 100) == "local.unsupportedFormat"


def test_url_of_2048_bytes_passes_2049_is_refused() -> None:
    base = "https://example.com/"
    ok = base + "a" * (2048 - len(base))
    check_url(ok)
    with pytest.raises(ImageRejected) as info:
        check_url(ok + "a")
    assert info.value.code == "local.urlTooLong"
    assert ok not in str(info.value)  # the message never repeats the URL
    assert API_EQUIVALENT["local.urlTooLong"] == (400, "exceededImageUrlLength")
    # bytes, not characters: 1000 two-byte characters are 2000 bytes
    with pytest.raises(ImageRejected):
        check_url(base + "é" * 1020)


def test_url_must_be_http() -> None:
    with pytest.raises(ImageRejected) as info:
        check_url("ftp://example.com/a.jpg")
    assert info.value.code == "local.illegalUrl"


def test_reencode_is_off_by_default_and_shrinks_large_images() -> None:
    big = encode(noise(1600, 1200), "PNG")  # noise PNG: ~5.8 MB
    info = check_image(big)
    assert maybe_reencode(big, info, None) is big
    assert maybe_reencode(big, info, len(big)) is big  # not above the threshold
    out = maybe_reencode(big, info, 1_000_000)
    assert len(out) <= 1_500_000
    again = check_image(out)
    assert again.format == "JPEG" and again.mode == "RGB"
    assert again.width / again.height == pytest.approx(1600 / 1200, rel=0.01)


def test_reencode_turns_cmyk_into_rgb() -> None:
    data = encode(noise(400, 300, "CMYK"), "JPEG", quality=100)
    out = maybe_reencode(data, check_image(data), 1)
    assert check_image(out).mode == "RGB"
