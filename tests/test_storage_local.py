"""Resolver on local sources: files, tar / tar.gz / zip members, http URLs, bad URIs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image as PILImage

from workers.api.client import Image
from workers.config import Settings
from workers.errors import ConfigError, ImageRejected, InputError
from workers.imagecheck import MAX_BYTES, check_image
from workers.message import ImageRef
from workers.storage import Resolver, parse_uri
from workers.storage.archives import ArchiveReader
from workers.storage.optional import require
from workers.storage.uris import archive_uri, encode_part, file_uri, object_uri


def jpeg(seed: int, size: tuple[int, int] = (64, 32)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", size, (seed % 256, 80, 160)).save(buf, format="JPEG")
    return buf.getvalue()


def refs(*sources: str) -> list[ImageRef]:
    return [ImageRef(s) for s in sources]


@pytest.fixture
def resolver() -> Iterator[Resolver]:
    r = Resolver(Settings())
    yield r
    r.close()


def write_tar(path: Path, members: dict[str, bytes], mode: str = "w") -> None:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


# -- URIs ------------------------------------------------------------------------------------


def test_uri_round_trip_keeps_unicode_and_spaces_readable() -> None:
    uri = file_uri("/data/cam 1/车牌 ü.jpg")
    assert uri == "file:///data/cam 1/车牌 ü.jpg"
    assert parse_uri(uri).path == "/data/cam 1/车牌 ü.jpg"
    tricky = archive_uri("tar", "/d/a#b.tar", "x?y#z%.jpg")
    loc = parse_uri(tricky)
    assert (loc.kind, loc.path, loc.member) == ("tar", "/d/a#b.tar", "x?y#z%.jpg")
    s3 = object_uri("s3", "bkt", "k?v=1#f.jpg")
    assert "?" not in s3 and "#" not in s3  # a key never turns into a query or fragment
    assert parse_uri(s3).key == "k?v=1#f.jpg"
    assert encode_part("plain/name.jpg") == "plain/name.jpg"


@pytest.mark.parametrize(
    "bad", ["ftp://host/x.jpg", "no-scheme.jpg", "file://relative/x.jpg", "tar:///a.tar", "s3://bkt"]
)
def test_bad_uris_name_themselves(bad: str) -> None:
    with pytest.raises(InputError) as info:
        parse_uri(bad)
    assert bad.split("://")[0] in str(info.value) or bad in str(info.value)


# -- files -----------------------------------------------------------------------------------


def test_files_with_unicode_and_spaces_become_checked_bytes(tmp_path: Path, resolver: Resolver) -> None:
    good = tmp_path / "车牌 camera 1" / "ü 0001 #1?.jpg"
    good.parent.mkdir()
    good.write_bytes(jpeg(1))
    pdf = tmp_path / "report.jpg"
    pdf.write_bytes(b"%PDF-1.4\n%%EOF\n")
    big = tmp_path / "big.jpg"
    big.write_bytes(jpeg(2) + b"\x00" * MAX_BYTES)
    out = resolver.resolve_many(
        refs(
            file_uri(str(good)), file_uri(str(pdf)), file_uri(str(big)), file_uri(str(tmp_path / "gone.jpg"))
        )
    )
    assert isinstance(out[0], Image) and out[0].body == good.read_bytes()
    assert isinstance(out[1], ImageRejected) and out[1].code == "local.unsupportedFormat"
    assert isinstance(out[2], ImageRejected) and out[2].code == "local.imageTooLarge"
    assert isinstance(out[3], InputError) and "not found" in str(out[3])


def test_directory_and_unknown_scheme_are_input_errors(tmp_path: Path, resolver: Resolver) -> None:
    out = resolver.resolve_many(refs(file_uri(str(tmp_path)), "gopher://x/y.jpg"))
    assert all(isinstance(o, InputError) for o in out)


def test_source_root_confines_worker_reads(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "in.jpg").write_bytes(jpeg(3))
    (tmp_path / "out.jpg").write_bytes(jpeg(4))
    (root / "link.jpg").symlink_to(tmp_path / "out.jpg")
    r = Resolver(Settings(source_root=str(root)))
    try:
        out = r.resolve_many(
            refs(
                file_uri(str(root / "in.jpg")),
                file_uri(str(tmp_path / "out.jpg")),
                file_uri(str(root / "link.jpg")),
            )
        )
    finally:
        r.close()
    assert isinstance(out[0], Image)
    assert isinstance(out[1], InputError) and "outside" in str(out[1])
    assert isinstance(out[2], InputError)  # a symlink out of the root is outside too


def test_reencode_setting_shrinks_big_files(tmp_path: Path) -> None:
    noisy = PILImage.frombytes("RGB", (900, 700), os.urandom(900 * 700 * 3))
    path = tmp_path / "noise.png"
    noisy.save(path, format="PNG")
    r = Resolver(Settings(reencode_above_bytes=500_000))
    try:
        (out,) = r.resolve_many(refs(file_uri(str(path))))
    finally:
        r.close()
    assert isinstance(out, Image) and out.body is not None
    assert len(out.body) < path.stat().st_size
    assert check_image(out.body).format == "JPEG"


def test_http_urls_pass_through_and_long_ones_are_refused(resolver: Resolver) -> None:
    ok = "https://images.example.com/a b.jpg?camera=3"
    long = "https://images.example.com/" + "x" * 2030  # 2057 bytes
    out = resolver.resolve_many(refs(ok, long))
    assert isinstance(out[0], Image) and out[0].url == ok
    assert isinstance(out[1], ImageRejected) and out[1].code == "local.urlTooLong"


# -- archives --------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix,mode", [(".tar", "w"), (".tar.gz", "w:gz"), (".tar.xz", "w:xz")])
def test_tar_members_resolve_in_any_order(tmp_path: Path, resolver: Resolver, suffix: str, mode: str) -> None:
    members = {f"cam 1/{i:03d} 车.jpg": jpeg(i) for i in range(30)}
    path = tmp_path / f"day{suffix}"
    write_tar(path, members, mode)
    names = list(members)
    # chunk 1 (in order), chunk 2 (further on: the cursor continues), chunk 3 (behind: restart)
    for chunk in (names[0:10], names[10:20], [*names[2:5], "missing.jpg"]):
        out = resolver.resolve_many(refs(*(archive_uri("tar", str(path), n) for n in chunk)))
        for name, got in zip(chunk, out, strict=True):
            if name == "missing.jpg":
                assert isinstance(got, InputError) and "not in the archive" in str(got)
            else:
                assert isinstance(got, Image) and got.body == members[name]


def test_zip_members_and_archive_errors(tmp_path: Path, resolver: Resolver) -> None:
    path = tmp_path / "day.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a/1.jpg", jpeg(1))
        zf.writestr("a/empty.jpg", b"")
        zf.writestr("a/dir/", b"")
    not_zip = tmp_path / "fake.zip"
    not_zip.write_bytes(b"this is not a zip")
    out = resolver.resolve_many(
        refs(
            archive_uri("zip", str(path), "a/1.jpg"),
            archive_uri("zip", str(path), "a/empty.jpg"),
            archive_uri("zip", str(path), "a/dir/"),
            archive_uri("zip", str(path), "nope.jpg"),
            archive_uri("zip", str(not_zip), "x.jpg"),
            archive_uri("zip", str(tmp_path / "absent.zip"), "x.jpg"),
        )
    )
    assert isinstance(out[0], Image) and out[0].body == jpeg(1)
    assert isinstance(out[1], ImageRejected) and out[1].code == "local.emptyImage"
    # A directory entry, and a file that is not a zip: that member's (or archive's) rule.
    assert [getattr(o, "code", None) for o in (out[2], out[4])] == ["local.archive", "local.archive"]
    assert isinstance(out[3], InputError) and "not in the archive" in str(out[3])
    assert isinstance(out[5], InputError) and "not found" in str(out[5])


def test_oversized_member_is_refused_from_its_header(tmp_path: Path, resolver: Resolver) -> None:
    path = tmp_path / "big.tar"
    write_tar(path, {"big.jpg": jpeg(1) + b"\x00" * MAX_BYTES, "ok.jpg": jpeg(2)})
    out = resolver.resolve_many(
        refs(archive_uri("tar", str(path), "big.jpg"), archive_uri("tar", str(path), "ok.jpg"))
    )
    assert isinstance(out[0], ImageRejected) and out[0].code == "local.imageTooLarge"
    assert isinstance(out[1], Image)


def test_truncated_tar_gz_keeps_what_was_readable(tmp_path: Path) -> None:
    members = {f"{i:03d}.jpg": os.urandom(20_000) for i in range(20)}  # incompressible
    path = tmp_path / "cut.tar.gz"
    write_tar(path, members, "w:gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    got = ArchiveReader().read("tar", str(path), list(members))
    assert isinstance(got["000.jpg"], bytes) and got["000.jpg"] == members["000.jpg"]
    cut = got["019.jpg"]
    assert isinstance(cut, ImageRejected) and cut.code == "local.archive"
    assert "truncated or corrupt" in str(cut)


def test_rewritten_archive_is_reopened(tmp_path: Path) -> None:
    path = tmp_path / "day.tar"
    write_tar(path, {"a.jpg": b"one"})
    reader = ArchiveReader()
    assert reader.read("tar", str(path), ["a.jpg"])["a.jpg"] == b"one"
    write_tar(path, {"pad.bin": b"x" * 1000, "a.jpg": b"two!"})
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
    assert reader.read("tar", str(path), ["a.jpg"])["a.jpg"] == b"two!"
    reader.close()


# -- optional dependencies -------------------------------------------------------------------


def test_missing_optional_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 now raises ImportError
    with pytest.raises(ConfigError) as info:
        require("boto3")
    assert "pip install 'carnumber[s3]'" in str(info.value)
    monkeypatch.setitem(sys.modules, "oss2", None)
    r = Resolver(Settings(oss_endpoint="oss-cn-hangzhou.aliyuncs.com"))
    with pytest.raises(ConfigError) as info:
        r.resolve_many(refs("oss://bkt/a.jpg"))
    assert "carnumber[oss]" in str(info.value)


def test_storage_import_does_not_load_boto3_or_oss2() -> None:
    code = (
        "import sys, workers.storage, producers.sources, producers.ledger;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 'oss2')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    assert out.stdout.strip() == "[]"
