"""Manifest sources: txt/lst, csv, jsonl, parquet; metadata, containment, bad lines, signed URLs.

Every line that names an image is one item: a bad line is listed refused (its one failed row,
with the rule's code), never silently dropped; a repeated image is reported to ``on_skip``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producers.sources import open_source
from workers.config import Settings
from workers.errors import InputError
from workers.message import ImageRef
from workers.storage.uris import parse_uri

SIGNED = "https://bkt.s3.amazonaws.com/a.jpg?X-Amz-Signature=abc&X-Amz-Credential=AKIA"


def collect(path: Path, settings: Settings | None = None, **kw: object) -> tuple[list[ImageRef], list[str]]:
    skipped: list[InputError] = []
    refs = list(open_source(str(path), settings or Settings(), on_skip=skipped.append, **kw))  # type: ignore[arg-type]
    return refs, [str(e) for e in skipped]


def accepted(refs: list[ImageRef]) -> list[ImageRef]:
    return [r for r in refs if r.refused is None]


def refusals(refs: list[ImageRef]) -> list[tuple[str, str]]:
    """(code, line number) of each refused ref, from its ``file:line:`` message."""
    return [(r.refused[0], r.refused[1].split(":")[1]) for r in refs if r.refused is not None]


def test_plain_list_of_paths_and_uris(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    manifest = tmp_path / "list.txt"
    manifest.write_text(
        "\ufeff# nightly list\n"
        "img/a b.jpg\n"
        "\n"
        "   img/车牌.jpg   \n"
        "s3://bkt/cam/1.jpg\n"
        "oss://bkt/cam/2.jpg\n"
        "https://cdn.example.com/x.jpg?size=big\n"
        f"{SIGNED}\n"
        "../outside.jpg\n"
        f"file://{tmp_path}/img/c.jpg\n",
        encoding="utf-8",
    )
    refs, skipped = collect(manifest)
    assert [r.source for r in refs] == [
        f"file://{tmp_path}/img/a b.jpg",
        f"file://{tmp_path}/img/车牌.jpg",
        "s3://bkt/cam/1.jpg",
        "oss://bkt/cam/2.jpg",
        "https://cdn.example.com/x.jpg",  # no query parameter kept by default
        "https://bkt.s3.amazonaws.com/a.jpg",  # the signed URL: its signature sealed, not listed
        f"manifest://{manifest}#9",
        f"file://{tmp_path}/img/c.jpg",
    ]
    assert skipped == []
    # The dropped query is sealed (kept out of the message), and it is what the worker fetches.
    assert [r.secret_url for r in refs[4:6]] == ["https://cdn.example.com/x.jpg?size=big", SIGNED]
    assert refs[5].sealed and "abc" not in str(refs[5].to_wire()) and "abc" not in repr(refs[5])
    assert refusals(refs) == [("local.outsideRoot", "9")]
    assert refs == collect(manifest)[0]  # the same sequence (and ids) every time


def test_csv_with_metadata_columns(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "camera,path,captured_at,note\n"
        "c1,img/1.jpg,2026-11-23T10:00:00,\n"
        'c2,img/2.jpg,2026-11-23T11:00:00,"with, comma"\n'
        "c3,img/3.jpg\n"
        "c4,,2026-11-23T12:00:00,no path\n"
        "c5,img/5.jpg,2026-11-23T13:00:00,ok\n",
        encoding="utf-8",
    )
    refs, skipped = collect(manifest)
    assert [parse_uri(r.source).path for r in accepted(refs)] == [
        str(tmp_path / "img/1.jpg"),
        str(tmp_path / "img/2.jpg"),
        str(tmp_path / "img/5.jpg"),
    ]
    assert refs[0].meta == {"camera": "c1", "captured_at": "2026-11-23T10:00:00"}
    assert refs[1].meta["note"] == "with, comma"
    assert refusals(refs) == [("local.manifest", "4"), ("local.manifest", "5")]
    assert refs[2].source == f"manifest://{manifest}#4" and skipped == []


def test_csv_without_url_or_path_column_fails_at_open(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("camera,file\nc1,a.jpg\n", encoding="utf-8")
    with pytest.raises(InputError, match="'url' or 'path'"):
        open_source(str(manifest), Settings())


def test_csv_bad_encoding_line_is_refused(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"url,cam\nhttps://h/1.jpg,a\nhttps://h/\xff\xfe.jpg,b\nhttps://h/3.jpg,c\n")
    refs, _skipped = collect(manifest)
    assert [r.source for r in accepted(refs)] == ["https://h/1.jpg", "https://h/3.jpg"]
    assert [r.refused for r in refs if r.refused] == [("local.manifest", "m.csv:3: not UTF-8")]


def test_jsonl_with_nested_metadata_and_bad_lines(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    lines = [
        json.dumps({"url": "s3://bkt/a.jpg", "camera": 7, "tags": ["x", "y"], "gone": None}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"path": "a.jpg", "url": "", "gps": {"lat": 30.1}}),
        json.dumps({"camera": 1}),
        json.dumps({"url": SIGNED}),
    ]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    refs, _skipped = collect(manifest)
    ok = accepted(refs)
    assert ok[0].source == "s3://bkt/a.jpg"
    assert ok[0].meta == {"camera": "7", "tags": '["x","y"]'}
    assert ok[1].source == f"file://{tmp_path}/a.jpg" and ok[1].meta == {"gps": '{"lat":30.1}'}
    assert ok[2].source == "https://bkt.s3.amazonaws.com/a.jpg" and ok[2].secret_url == SIGNED
    assert refusals(refs) == [("local.manifest", "2"), ("local.manifest", "3"), ("local.manifest", "5")]


def test_parquet_manifest_in_batches(tmp_path: Path) -> None:
    n = 20_000  # more than one 8192-row batch
    table = pa.table(
        {
            "url": [f"oss://bkt/cam/{i:06d}.jpg" if i != 5 else None for i in range(n)],
            "camera": pa.array([i % 3 for i in range(n)], pa.int32()),
            "ts": pa.array([datetime(2026, 11, 23, 0, 0, i % 60) for i in range(n)], pa.timestamp("s")),
        }
    )
    manifest = tmp_path / "m.parquet"
    pq.write_table(table, manifest)
    refs, skipped = collect(manifest)
    assert len(refs) == n and skipped == []
    assert [r.refused for r in refs if r.refused] == [("local.manifest", "m.parquet:6: no url or path value")]
    assert refs[0].source == "oss://bkt/cam/000000.jpg"
    assert refs[0].meta == {"camera": "0", "ts": "2026-11-23T00:00:00"}
    assert refs[-1].source == f"oss://bkt/cam/{n - 1:06d}.jpg"


def test_relative_paths_resolve_against_source_root_and_cannot_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "cams").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (root / "cams" / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    elsewhere = tmp_path / "lists"
    elsewhere.mkdir()
    manifest = elsewhere / "m.lst"
    manifest.write_text(
        "cams/a.jpg\n"
        "cams/../cams/b.jpg\n"
        "../secret.jpg\n"
        "cams/link.jpg\n"
        f"{tmp_path}/secret.jpg\n"
        f"{root}/cams/c.jpg\n"
        f"tar://{tmp_path}/other.tar#x.jpg\n",
        encoding="utf-8",
    )
    refs, _ = collect(manifest, Settings(source_root=str(root)))
    assert [parse_uri(r.source).path for r in accepted(refs)] == [
        str(root / "cams/a.jpg"),
        str(root / "cams/b.jpg"),
        str(root / "cams/c.jpg"),
    ]
    assert [line for _, line in refusals(refs)] == ["3", "4", "5", "7"]
    assert {code for code, _ in refusals(refs)} == {"local.outsideRoot"}
    assert refs[2].source == f"manifest://{manifest}#3"  # the line is the item: nothing is read
    # without source_root, relative paths are confined to the manifest's folder and
    # absolute ones are taken as written
    refs, _skipped = collect(manifest)
    assert refusals(refs) == [("local.outsideRoot", "3")]
    assert [parse_uri(r.source).path for r in accepted(refs)] == [
        str(elsewhere / "cams/a.jpg"),
        str(elsewhere / "cams/b.jpg"),
        str(elsewhere / "cams/link.jpg"),
        str(tmp_path / "secret.jpg"),
        str(root / "cams/c.jpg"),
        str(tmp_path / "other.tar"),
    ]


def test_manifest_time_window_uses_dates_in_paths(tmp_path: Path) -> None:
    manifest = tmp_path / "m.txt"
    manifest.write_text(
        "s3://b/2026-11-22/a.jpg\ns3://b/2026-11-23/b.jpg\ns3://b/nodate/c.jpg\n", encoding="utf-8"
    )
    refs, _ = collect(manifest, since=datetime(2026, 11, 23))
    assert [r.source for r in refs] == ["s3://b/2026-11-23/b.jpg", "s3://b/nodate/c.jpg"]


def test_refused_and_repeated_lines_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"gopher://x/{SIGNED}\nhttps://h/ok.jpg\nhttps://h/ok.jpg\n", encoding="utf-8")
    refs = list(open_source(str(manifest), Settings()))
    assert [r.source for r in accepted(refs)] == ["https://h/ok.jpg"]
    assert refusals(refs) == [("local.manifest", "1")]
    assert "m.txt:1" in caplog.text and "abc" not in caplog.text  # never a signature in a log
    assert "m.txt:3: the same image as an earlier line" in caplog.text
