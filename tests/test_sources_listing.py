"""Listing sources: folders, archives, S3 (moto server) and OSS (loopback server) prefixes."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers.oss_server import FakeOss
from helpers.s3_server import moto_s3, s3_client

from producers.sources import open_source
from producers.sources.filters import Filter, date_in_path
from workers.config import Settings
from workers.errors import InputError
from workers.storage.uris import parse_uri


def touch(path: Path, mtime: datetime | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    if mtime is not None:
        ts = mtime.timestamp()
        os.utime(path, (ts, ts))


def rel(root: Path, uri: str) -> str:
    return os.path.relpath(parse_uri(uri).path, root)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for name in [
        "b/2026-11-23/0002.jpg",
        "b/2026-11-23/0001.JPG",
        "b/2026-11-24/0003.png",
        "a/nodate.jpg",
        "a/notes.txt",
        "a/.DS_Store",
        "c d/车牌 ü 1.jpeg",
        "Z/upper.webp",
    ]:
        touch(root / name, datetime(2026, 11, 20, 12, tzinfo=UTC))
    return root


def test_folder_listing_is_recursive_sorted_and_images_only(folder: Path) -> None:
    got = [rel(folder, r.source) for r in open_source(str(folder), Settings())]
    assert got == [
        "Z/upper.webp",
        "a/nodate.jpg",
        "b/2026-11-23/0001.JPG",
        "b/2026-11-23/0002.jpg",
        "b/2026-11-24/0003.png",
        "c d/车牌 ü 1.jpeg",
    ]
    again = [r.image_id for r in open_source(f"file://{folder}", Settings())]
    assert again == [r.image_id for r in open_source(str(folder), Settings())]  # deterministic


def test_glob_is_case_insensitive_and_path_aware(folder: Path) -> None:
    jpgs = [rel(folder, r.source) for r in open_source(str(folder), Settings(), glob="*.jpg")]
    assert jpgs == ["a/nodate.jpg", "b/2026-11-23/0001.JPG", "b/2026-11-23/0002.jpg"]
    under_b = [rel(folder, r.source) for r in open_source(str(folder), Settings(), glob="b/*")]
    assert len(under_b) == 3
    txt = [rel(folder, r.source) for r in open_source(str(folder), Settings(), glob="*.txt")]
    assert txt == ["a/notes.txt"]


def test_time_window_uses_the_date_in_the_path_else_mtime(folder: Path) -> None:
    touch(folder / "a/recent.jpg", datetime(2026, 11, 23, 15, tzinfo=UTC))
    got = [
        rel(folder, r.source)
        for r in open_source(
            str(folder),
            Settings(),
            since=datetime(2026, 11, 23, tzinfo=UTC),
            until=datetime(2026, 11, 24, tzinfo=UTC),
        )
    ]
    # path dates: 11-23 kept, 11-24 out; no date: mtime 11-20 out, 11-23 15:00 in
    assert got == ["a/recent.jpg", "b/2026-11-23/0001.JPG", "b/2026-11-23/0002.jpg"]


def test_dates_in_paths() -> None:
    assert date_in_path("cam/2026/11/23/x.jpg") == (datetime(2026, 11, 23), datetime(2026, 11, 24))
    assert date_in_path("IMG_20261123_101500.jpg") == (
        datetime(2026, 11, 23, 10, 15),
        datetime(2026, 11, 23, 10, 15, 1),
    )
    assert date_in_path("2025-01-01/cam_2026-02-30.jpg") is None  # the last date is invalid
    assert date_in_path("frame_123456789.jpg") is None
    with pytest.raises(InputError):
        Filter(since=datetime(2026, 1, 2), until=datetime(2026, 1, 1))


def test_symlinks_out_of_the_folder_are_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    touch(root / "in.jpg")
    touch(tmp_path / "secret.jpg")
    (root / "escape.jpg").symlink_to(tmp_path / "secret.jpg")
    (root / "loop").symlink_to(root)
    (root / "inner.jpg").symlink_to(root / "in.jpg")
    listed = list(open_source(str(root), Settings()))
    assert [rel(root, r.source) for r in listed] == ["escape.jpg", "in.jpg", "inner.jpg"]
    # The link out of the folder is listed refused (one row, never read); the loop is not walked.
    assert [r.refused[0] if r.refused else None for r in listed] == ["local.link", None, None]


def write_archives(tmp_path: Path) -> dict[str, Path]:
    names = ["cam/003.jpg", "cam/001.jpg", "cam/readme.txt", "cam/2026-11-24/002.jpg", "车 牌.jpg"]
    paths = {}
    for suffix, mode in ((".tar", "w"), (".tar.gz", "w:gz")):
        path = tmp_path / f"day{suffix}"
        with tarfile.open(path, mode) as tf:
            for name in names:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = 1, int(datetime(2026, 11, 23, 12, tzinfo=UTC).timestamp())
                tf.addfile(info, io.BytesIO(b"x"))
            info = tarfile.TarInfo("cam/sub")
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        paths[suffix] = path
    path = tmp_path / "day.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name in names:
            zf.writestr(zipfile.ZipInfo(name, date_time=(2026, 11, 23, 12, 0, 0)), b"x")
    paths[".zip"] = path
    return paths


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".zip"])
def test_archive_members_in_archive_order(tmp_path: Path, suffix: str) -> None:
    path = write_archives(tmp_path)[suffix]
    kind = "zip" if suffix == ".zip" else "tar"
    refs = list(open_source(str(path), Settings()))
    locs = [parse_uri(r.source) for r in refs]
    assert {loc.kind for loc in locs} == {kind} and {loc.path for loc in locs} == {str(path)}
    assert [loc.member for loc in locs] == [
        "cam/003.jpg",
        "cam/001.jpg",
        "cam/2026-11-24/002.jpg",
        "车 牌.jpg",
    ]
    dated = list(open_source(str(path), Settings(), since=datetime(2026, 11, 24)))
    assert [parse_uri(r.source).member for r in dated] == ["cam/2026-11-24/002.jpg"]
    globbed = list(open_source(str(path), Settings(), glob="cam/0*.jpg"))
    assert len(globbed) == 2


def test_not_an_archive_fails_at_open(tmp_path: Path) -> None:
    fake = tmp_path / "fake.tar.gz"
    fake.write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match=r"fake\.tar\.gz"):
        open_source(str(fake), Settings())


@pytest.mark.parametrize(
    "uri", ["https://example.com/x.jpg", "ftp://host/dir", "/definitely/not/here", "notes.docx"]
)
def test_unknown_sources_name_the_uri_and_the_accepted_forms(tmp_path: Path, uri: str) -> None:
    if uri == "notes.docx":
        uri = str(tmp_path / uri)
        Path(uri).write_bytes(b"x")
    with pytest.raises(InputError) as info:
        open_source(uri, Settings())
    message = str(info.value)
    assert uri.split("?")[0] in message
    assert "s3://" in message or "no such file" in message


def test_s3_prefix_listing() -> None:
    with moto_s3() as endpoint:
        client = s3_client(endpoint)
        client.create_bucket(Bucket="cn-sources-s3")
        for key in [
            "cam1/2026-11-23/b.jpg",
            "cam1/2026-11-23/a.JPG",
            "cam1/2026-11-24/c.jpg",
            "cam1/x.txt",
            "cam2/d.jpg",
        ]:
            client.put_object(Bucket="cn-sources-s3", Key=key, Body=b"x")
        settings = Settings(s3_endpoint_url=endpoint)
        refs = list(open_source("s3://cn-sources-s3/cam1/", settings))
        assert [r.source for r in refs] == [
            "s3://cn-sources-s3/cam1/2026-11-23/a.JPG",
            "s3://cn-sources-s3/cam1/2026-11-23/b.jpg",
            "s3://cn-sources-s3/cam1/2026-11-24/c.jpg",
        ]
        dated = list(open_source("s3://cn-sources-s3/cam1", settings, since=datetime(2026, 11, 24)))
        assert [r.source for r in dated] == ["s3://cn-sources-s3/cam1/2026-11-24/c.jpg"]
        with pytest.raises(InputError):
            open_source("s3://cn-sources-missing/x", settings)


def test_oss_prefix_listing() -> None:
    with FakeOss() as oss:
        for key in ["cam/2.jpg", "cam/1 车.jpg", "cam/skip.txt", "other/3.jpg"]:
            oss.put("bkt", key, b"x")
        settings = Settings(
            oss_endpoint=oss.endpoint,
            oss_access_key_id=oss.access_key_id,
            oss_access_key_secret=oss.access_key_secret,
        )
        refs = list(open_source("oss://bkt/cam/", settings))
        assert [r.source for r in refs] == ["oss://bkt/cam/1 车.jpg", "oss://bkt/cam/2.jpg"]
