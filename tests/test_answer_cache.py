"""The answer cache's storage format (``workers/answer_cache.py``): segments written, found by
content key with block reads, folded together size-tiered without losing or changing an answer,
on local disk and on a real S3-compatible server (moto), with readers that outlive a merge."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from helpers.s3_server import moto_s3, s3_client

from workers import answer_cache
from workers.answer_cache import AnswerCache, add_segment, merge, read_manifest
from workers.sink.dataset import open_dataset


def _key(i: int) -> str:
    return "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()


def _entries(lo: int, hi: int, tag: str = "") -> list[tuple[str, bytes]]:
    return [(_key(i), f"answer {i}{tag}".encode()) for i in range(lo, hi)]


def test_lookup_finds_every_written_key_and_nothing_else(tmp_path: Path) -> None:
    fs, d = pafs.LocalFileSystem(), str(tmp_path / "c")
    add_segment(fs, d, _entries(0, 5000))
    cache = AnswerCache(fs, d)
    found = cache.lookup([_key(i) for i in range(0, 6000, 7)])
    assert found == {_key(i): f"answer {i}".encode() for i in range(0, 5000, 7)}
    assert cache.entries() == 5000
    # What a reader keeps: the fences, 1/FENCE of the keys.
    assert sum(len(r.fence) for r in cache._current()) == -(-5000 // answer_cache.FENCE)


def test_a_64_bit_collision_is_a_miss_not_a_wrong_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, d = pafs.LocalFileSystem(), str(tmp_path / "c")
    add_segment(fs, d, [("sha256:aaa", b"A")])
    monkeypatch.setattr(answer_cache, "key_of", lambda content_key: 42)
    add_segment(fs, d, [("sha256:bbb", b"B")])
    cache = AnswerCache(fs, d)
    # Both now live under key 42: each lookup finds its own or nothing.
    assert cache.lookup(["sha256:bbb"]) == {"sha256:bbb": b"B"}
    assert cache.lookup(["sha256:ccc"]) == {}


def test_equal_keys_keep_the_first_answer(tmp_path: Path) -> None:
    fs, d = pafs.LocalFileSystem(), str(tmp_path / "c")
    add_segment(fs, d, [(_key(1), b"first"), (_key(1), b"again")])
    add_segment(fs, d, [(_key(1), b"later run")])
    assert AnswerCache(fs, d).lookup([_key(1)]) == {_key(1): b"later run"}  # newest segment first
    assert merge(fs, d, max_segments=1)
    assert AnswerCache(fs, d).lookup([_key(1)]) == {_key(1): b"first"}  # the run that paid first


def test_merge_is_size_tiered_and_keeps_every_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(answer_cache, "RANGE_ENTRIES", 200)  # merge in many key ranges
    fs, d = pafs.LocalFileSystem(), str(tmp_path / "c")
    add_segment(fs, d, _entries(0, 8000))  # an old, big segment
    for night in range(6):
        lo = 8000 + night * 200
        add_segment(fs, d, _entries(lo, lo + 200))
        merge(fs, d, max_segments=4)
        assert len(read_manifest(fs, d)) <= 4
    sizes = [s.entries for s in read_manifest(fs, d)]
    assert 8000 in sizes  # never rewritten: the small nights were folded among themselves
    assert sum(sizes) == 9200
    cache = AnswerCache(fs, d)
    keys = [_key(i) for i in range(9200)]
    assert cache.lookup(keys) == dict(_entries(0, 9200))
    leftovers = {p.name.split(".")[0] for p in Path(d).glob("seg-*")}
    assert leftovers == {s.name for s in read_manifest(fs, d)}  # merged segments are deleted


def test_a_reader_opened_before_a_merge_reloads_and_still_finds(tmp_path: Path) -> None:
    fs, d = pafs.LocalFileSystem(), str(tmp_path / "c")
    add_segment(fs, d, _entries(0, 100))
    add_segment(fs, d, _entries(100, 200))
    cache = AnswerCache(fs, d, refresh_s=3600)
    assert len(cache.lookup([_key(5), _key(150)])) == 2
    assert merge(fs, d, max_segments=1)
    assert cache.lookup([_key(7), _key(170)]) == {_key(7): b"answer 7", _key(170): b"answer 170"}


def test_no_cache_yet_finds_nothing(tmp_path: Path) -> None:
    cache = AnswerCache(pafs.LocalFileSystem(), str(tmp_path / "none"))
    assert cache.lookup([_key(1)]) == {} and cache.entries() == 0


def test_on_a_real_s3_server(tmp_path: Path) -> None:
    with moto_s3() as endpoint:
        s3_client(endpoint).create_bucket(Bucket="answers-out")
        host = endpoint.removeprefix("http://")
        output = f"s3://answers-out/plates?endpoint_override={host}&scheme=http&region=us-east-1"
        dataset = open_dataset(output)
        fs, d = dataset.fs, answer_cache.cache_dir(dataset.root)
        add_segment(fs, d, _entries(0, 3000))
        add_segment(fs, d, _entries(3000, 3500))
        cache = AnswerCache.beside(open_dataset(output))
        wanted = [_key(i) for i in np.random.default_rng(1).integers(0, 4000, 200)]
        assert cache.lookup(wanted) == {k: v for k, v in _entries(0, 3500) if k in set(wanted)}
        assert merge(fs, d, max_segments=1)
        assert len(cache.lookup([_key(3), _key(3400)])) == 2


def test_a_damaged_cache_costs_calls_not_the_chunk(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    """The worker's side (``workers/earlier.py``): a damaged entry or an unreadable segment is a
    miss, logged, and the picture is called; a good entry still answers."""
    import asyncio

    import redis.asyncio as aredis

    from workers.api.response import Recognition
    from workers.books.journal import Answer
    from workers.earlier import EarlierAnswers
    from workers.keys import Keys

    fs, d = pafs.LocalFileSystem(), str(tmp_path / "c")
    good = Answer(0, recognition=Recognition("req", ()), by="img-1").to_json().encode()
    add_segment(fs, d, [(_key(1), good), (_key(2), b"{not json")])

    async def ask(keys: list[str]) -> dict[str, object]:
        client = aredis.Redis.from_url(redis_url)
        try:
            return dict(await EarlierAnswers(AnswerCache(fs, d), client, Keys(key_prefix)).lookup("r", keys))
        finally:
            await client.aclose()

    found = asyncio.run(ask([_key(1), _key(2)]))
    assert set(found) == {_key(1)}
    for seg in Path(d).glob("seg-*.idx"):
        seg.write_bytes(b"\0" * 7)  # cut short: every read of it fails
    assert asyncio.run(ask([_key(1)])) == {}
