"""The generated bad-input corpus (``ocrserver/bad_corpus.py``) through the real producer and the
real worker path: every item the producer lists gets exactly one row, with the outcome the corpus
names for it (``answered`` or the code of the rule it broke); nothing raises out of a chunk.

Real parts: the sources (folder, tar, tar.gz, zip, csv, jsonl, txt), the broker's wire format (each
chunk goes through JSON and back), the local server (replay recognizer), Redis, Parquet.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from ocrserver.bad_corpus import ANSWERED, write_bad_corpus
from ocrserver.config import ServerConfig
from ocrserver.server import RunningServer, start_server
from producers.sources import open_source
from workers.config import Settings
from workers.errors import InputError
from workers.message import Chunk
from workers.runner import Runtime, execute_chunk

pytestmark = pytest.mark.skipif(os.name != "posix", reason="names that are not UTF-8, FIFOs, symlinks")


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with start_server(ServerConfig(keys="bcid:bcsecret")) as srv:
        yield srv


def _outcome(rows: list[dict]) -> str:
    if rows[0]["status"] == "failed":
        return str(rows[0]["error_code"])
    return ANSWERED


@pytest.mark.parametrize("reencode", [False, True], ids=["as-stored", "re-encoded"])
def test_every_item_of_the_corpus_gets_exactly_its_one_outcome(
    reencode: bool, server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    corpus = write_bad_corpus(tmp_path / "corpus")
    env = {
        "CARNUMBER_ENDPOINT": server.url,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "bcid",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "bcsecret",
        "REDIS_URL": redis_url,
        "CARNUMBER_KEY_PREFIX": key_prefix,
        "CARNUMBER_OUTPUT": str(tmp_path / "out"),
        "CARNUMBER_QPS": "0",
    }
    if reencode:
        env["CARNUMBER_REENCODE_ABOVE_BYTES"] = "1"  # every picture re-encoded: its pixels decoded
    settings = Settings.from_env(env)
    skipped: list[InputError] = []
    with Runtime.from_settings(settings) as rt:
        rt.runs.create("bad", "corpus")
        rt.runs.touch("bad")
        for n, source in enumerate(corpus.sources):
            refs = list(open_source(source, settings, on_skip=skipped.append))
            assert [r.source for r in refs] == [e.source for e in corpus.expected[source]], source
            for k in range(0, len(refs), 5):
                chunk = Chunk("bad", f"s{n}-{k:07d}", tuple(refs[k : k + 5]))
                wired = Chunk.from_wire(json.loads(json.dumps(chunk.to_wire())))  # as the broker carries it
                result = execute_chunk(wired, rt)  # never raises for what is in a chunk
                assert result.pending == [], (source, result.pause)
        rows = rt.dataset.read_run("bad").to_pylist()
    by_image: dict[str, list[dict]] = {}
    for row in rows:
        by_image.setdefault(row["image_id"], []).append(row)
    expected = corpus.all()
    assert len({e.image_id for e in expected}) == len(expected)  # every item an id of its own
    wrong = {
        e.source[-70:]: (
            e.outcome_with(reencode),
            _outcome(by_image[e.image_id]) if e.image_id in by_image else None,
        )
        for e in expected
        if e.image_id not in by_image or _outcome(by_image[e.image_id]) != e.outcome_with(reencode)
    }
    assert wrong == {}
    # Exactly one outcome per item (one row, or one row per plate), and nothing else in the output.
    assert set(by_image) == {e.image_id for e in expected}
    assert all(len(v) == 1 or v[0]["status"] == "ok" for v in by_image.values())
    # The repeated manifest lines were not items of their own.
    assert sorted(str(s).split(":")[0] for s in skipped) == ["bad.csv", "bad.jsonl", "bad.txt"]
    codes = Counter(e.outcome_with(reencode) for e in expected)
    assert codes[ANSWERED] >= 20 and len(codes) >= 14  # a corpus worth the name
