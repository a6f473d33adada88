"""Untrusted names and archive members (issue 20, items 1-3): one odd item costs one row.

1. A name that is not UTF-8 (GBK from a Windows tool) no longer crashes the producer: it keeps a
   stable, reversible id and the worker reads the very file or member.
2. A bad archive member (encrypted, corrupt deflate) is that member's ``local.archive`` row; its
   chunk's other images are answered.
3. Pixels that do not decode when re-encoding are a ``local.decode`` row, not an ``OSError`` that
   the task would retry for ever.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image as PILImage

from ocrserver.bad_corpus import _corrupt_idat_png, raw_zip, zip_entry
from ocrserver.config import ServerConfig
from ocrserver.server import RunningServer, start_server
from producers.sources import open_source
from workers.api.client import Image
from workers.config import Settings
from workers.errors import ImageRejected
from workers.message import Chunk, ImageRef
from workers.runner import Runtime, execute_chunk
from workers.storage import Resolver
from workers.storage.uris import parse_uri

GBK = "车牌-粤B12345".encode("gbk") + b".jpg"  # not UTF-8


def jpeg(shade: int) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (64, 48), (shade, 40, 90)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with start_server(ServerConfig(keys="nmid:nmsecret")) as srv:
        yield srv


@pytest.fixture
def runtime(server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path) -> Iterator[Runtime]:
    rt = _runtime(server, redis_url, key_prefix, tmp_path)
    yield rt
    rt.close()


def _runtime(server: RunningServer, redis_url: str, key_prefix: str, tmp: Path, **env: str) -> Runtime:
    rt = Runtime.from_settings(
        Settings.from_env(
            {
                "CARNUMBER_ENDPOINT": server.url,
                "ALIBABA_CLOUD_ACCESS_KEY_ID": "nmid",
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "nmsecret",
                "REDIS_URL": redis_url,
                "CARNUMBER_KEY_PREFIX": key_prefix,
                "CARNUMBER_OUTPUT": str(tmp / "out"),
                "CARNUMBER_QPS": "0",
                **env,
            }
        )
    )
    rt.runs.create("r", "test")
    rt.runs.touch("r")
    return rt


def _rows_by_image(rt: Runtime) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rt.dataset.read_run("r").to_pylist():
        out.setdefault(row["image_id"], []).append(row)
    return out


# -- 1. names that are not UTF-8 ----------------------------------------------------------------


def _gbk_sources(tmp_path: Path) -> list[str]:
    folder = os.fsencode(tmp_path / "folder")
    os.makedirs(folder)
    for name, data in ((GBK, jpeg(1)), (b"ok.jpg", jpeg(2)), (b"zz-after.jpg", jpeg(3))):
        with open(folder + b"/" + name, "wb") as fh:
            fh.write(data)
    with tarfile.open(tmp_path / "day.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in ((GBK, jpeg(4)), (b"after.jpg", jpeg(5))):
            info = tarfile.TarInfo(os.fsdecode(name))
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    # A zip entry flagged UTF-8 whose name is GBK: zipfile refuses the whole archive for it.
    (tmp_path / "day.zip").write_bytes(
        raw_zip([zip_entry(GBK, jpeg(6), flags=0x800), zip_entry(b"after.jpg", jpeg(7))])
    )
    return [os.fsdecode(folder), str(tmp_path / "day.tar"), str(tmp_path / "day.zip")]


def test_names_that_are_not_utf8_are_listed_with_stable_reversible_ids(tmp_path: Path) -> None:
    for source in _gbk_sources(tmp_path):
        refs = list(open_source(source, Settings()))
        again = list(open_source(source, Settings()))
        # Nothing after the odd name is lost, and a re-run finds the same images under the same ids.
        assert len(refs) in (2, 3) and refs == again, source
        for ref in refs:
            # The id and the message are valid UTF-8 JSON (they go to Redis, Parquet and the broker).
            json.dumps(ref.to_wire(), ensure_ascii=False).encode("utf-8")
            assert ref.image_id == ImageRef(ref.source).image_id
        # The raw bytes are kept: as %XX in the URI (a zip's unflagged names read as cp437).
        odd = "%B3%B5%C5%C6-%D4%C1B12345.jpg" if not source.endswith(".zip") else GBK.decode("cp437")
        assert any(r.source.endswith(odd) for r in refs), [r.source for r in refs]
        # Reversible: the URI names exactly the file or member that was listed, and the worker reads it.
        out = Resolver(Settings()).resolve_many(refs)
        assert all(isinstance(o, Image) and o.body for o in out), (source, out)


def test_a_gbk_file_name_decodes_back_to_its_bytes(tmp_path: Path) -> None:
    folder = _gbk_sources(tmp_path)[0]
    (ref,) = [r for r in open_source(folder, Settings()) if "%" in r.source]
    assert os.fsencode(parse_uri(ref.source).path).endswith(b"/" + GBK)


# -- 2. bad archive members --------------------------------------------------------------------------


def _zip_with_bad_members(path: Path) -> list[str]:
    ok = jpeg(8)
    path.write_bytes(
        raw_zip(
            [
                zip_entry(b"a-ok.jpg", ok),
                zip_entry(b"b-encrypted.jpg", b"\x01" * 12 + ok, flags=0x1),
                zip_entry(
                    b"c-corrupt.jpg", b"\xff\xfe not deflate", method=8, size=len(ok), crc=zlib.crc32(ok)
                ),
                zip_entry(b"d-ok.jpg", jpeg(9)),
            ]
        )
    )
    return ["a-ok.jpg", "b-encrypted.jpg", "c-corrupt.jpg", "d-ok.jpg"]


def test_bad_zip_members_cost_their_own_row_only(tmp_path: Path, runtime: Runtime) -> None:
    path = tmp_path / "day.zip"
    names = _zip_with_bad_members(path)
    refs = list(open_source(str(path), Settings()))
    assert [parse_uri(r.source).member for r in refs] == names
    out = Resolver(Settings()).resolve_many(refs)
    assert isinstance(out[0], Image) and isinstance(out[3], Image)
    assert [(o.code, "encrypted" in o.message) for o in out[1:3]] == [  # type: ignore[union-attr]
        ("local.archive", True),
        ("local.archive", False),
    ]
    # The whole chunk through the worker: every member has its row, the run can finish.
    result = execute_chunk(Chunk("r", "0000000", tuple(refs)), runtime)
    assert (result.answered, result.failed, result.pending) == (2, 2, [])
    rows = _rows_by_image(runtime)
    assert sorted(len(v) for v in rows.values()) == [1, 1, 1, 1]
    assert sorted(v[0].get("error_code") or "" for v in rows.values()) == [
        "",
        "",
        "local.archive",
        "local.archive",
    ]


def test_a_member_that_is_a_link_or_damaged_costs_only_itself(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in (("a.jpg", jpeg(10)), ("b.jpg", jpeg(11))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    refs = list(open_source(str(path), Settings()))
    assert [r.refused[0] if r.refused else None for r in refs] == [None, None, "local.archive"]
    out = Resolver(Settings()).resolve_many(refs)
    assert [type(o).__name__ for o in out] == ["Image", "Image", "ImageRejected"]


def test_a_zip_that_is_not_a_zip_is_one_refusal_per_member_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "z.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.jpg", jpeg(12))
    refs = list(open_source(str(path), Settings()))
    path.write_bytes(b"PK\x05\x06" + b"\xff" * 18)  # rewritten meanwhile: garbage
    (out,) = Resolver(Settings()).resolve_many(refs)
    assert isinstance(out, ImageRejected) and out.code == "local.archive"


# -- 3. pixels that do not decode when re-encoding ---------------------------------------------------


def test_corrupt_pixels_are_a_decode_row_not_an_endless_retry(
    tmp_path: Path, server: RunningServer, redis_url: str, key_prefix: str
) -> None:
    rt = _runtime(server, redis_url, key_prefix, tmp_path, CARNUMBER_REENCODE_ABOVE_BYTES="1")
    try:
        bad, good = tmp_path / "corrupt-idat.png", tmp_path / "good.jpg"
        bad.write_bytes(_corrupt_idat_png())
        good.write_bytes(jpeg(13))
        refs = (ImageRef(bad.as_uri()), ImageRef(good.as_uri()))
        # Before: maybe_reencode's OSError escaped the chunk, and the task's autoretry_for
        # (OSError, max_retries=None) retried it for ever. Now: that image's row, the other's answer.
        result = execute_chunk(Chunk("r", "0000000", refs), rt)
        assert (result.answered, result.failed, result.pending) == (1, 1, [])
        rows = _rows_by_image(rt)
        (row,) = rows[refs[0].image_id]
        assert row["error_code"] == "local.decode" and row["retryable"] is False and row["attempts"] == 0
    finally:
        rt.close()


def test_a_re_encoded_exif_rotated_jpeg_stays_upright() -> None:
    from ocrserver.bad_corpus import _exif_rotated_jpeg
    from workers.imagecheck import check_image, maybe_reencode

    data = _exif_rotated_jpeg()  # stored 80 x 40, EXIF orientation 6: shown 40 x 80
    out = maybe_reencode(data, check_image(data), 1, target_bytes=10**6)
    assert PILImage.open(io.BytesIO(out)).size == (40, 80)
