"""The generated sample archive: files, truth file, embedded truth, determinism, speed."""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

from PIL import Image

from ocrserver.fonts import plate_font_path
from ocrserver.recognizers.base import PLATE_TYPES
from ocrserver.recognizers.onnx.grammar import match_format
from ocrserver.samples import _KINDS, generate_archive, random_plate, render_plate
from ocrserver.truth import read_truth


def test_archive_files_truth_and_embedded_truth(tmp_path: Path) -> None:
    truths = generate_archive(tmp_path, count=30, seed=4)
    lines = (tmp_path / "truth.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(truths) == len(lines) == 30
    assert sorted(p.name for p in tmp_path.glob("*.jpg")) == [f"sample_{i:05d}.jpg" for i in range(30)]
    for sample, line in zip(truths, lines, strict=True):
        doc = json.loads(line)
        assert doc == sample.to_json()
        assert set(doc) == {"name", "sha256", "plates"}
        data = (tmp_path / sample.name).read_bytes()
        assert data[:2] == b"\xff\xd8"
        assert hashlib.sha256(data).hexdigest() == sample.sha256
        embedded = read_truth(data)
        assert embedded is not None
        assert [(p.text, p.plate_type, p.polygon) for p in embedded] == [
            (p.text, p.plate_type, p.polygon) for p in sample.plates
        ]
        with Image.open(tmp_path / sample.name) as img:
            assert img.size == (640, 480)
        for plate in sample.plates:
            assert set(plate.to_json()) == {"text", "type", "polygon"}
            assert plate.plate_type in PLATE_TYPES
            assert match_format(plate.text) is not None, plate.text
            assert all(-2 <= x <= 642 and -2 <= y <= 482 for x, y in plate.polygon)
            (tl, tr, br, bl) = plate.polygon
            assert tl[0] < tr[0] and bl[0] < br[0] and tl[1] < bl[1] and tr[1] < br[1]


def test_same_seed_same_archive(tmp_path: Path) -> None:
    a = generate_archive(tmp_path / "a", count=5, seed=9)
    b = generate_archive(tmp_path / "b", count=5, seed=9)
    c = generate_archive(tmp_path / "c", count=5, seed=10)
    assert [s.sha256 for s in a] == [s.sha256 for s in b]
    assert [s.sha256 for s in a] != [s.sha256 for s in c]


def test_every_kind_is_a_valid_plate_of_its_type() -> None:
    rng = random.Random(1)
    seen = set()
    for _, kind in _KINDS:
        for _ in range(20):
            text, style = random_plate(rng, kind)
            assert match_format(text) is not None, (kind, text)
            seen.add(style.plate_type)
    assert seen == {
        "小型汽车", "大型汽车", "新能源车", "挂车", "教练车", "警车", "使领馆车", "港澳车", "军车"
    }


def test_plate_proportions() -> None:
    rng = random.Random(2)
    assert render_plate(*random_plate(rng, "blue")).size == (440, 140)
    assert render_plate(*random_plate(rng, "green")).size == (480, 140)
    assert render_plate(*random_plate(rng, "yellow_double")).size == (440, 220)
    blue = render_plate(*random_plate(rng, "blue"))
    r, _, b = blue.getpixel((20, 12))  # ground inside the border
    assert b > 150 and r < 60


def test_font_is_vendored_with_its_licence() -> None:
    font = plate_font_path()
    assert font.is_file() and font.stat().st_size < 64_000
    assert (font.parent / "LICENSE-OFL.txt").read_text(encoding="utf-8").startswith(
        "This Font Software is licensed under the SIL Open Font License")
    assert "Noto Sans SC" in (font.parent / "NOTICE").read_text(encoding="utf-8")


def test_generation_is_fast(tmp_path: Path) -> None:
    generate_archive(tmp_path / "warm", count=3, seed=0)  # glyph caches
    start = time.perf_counter()
    generate_archive(tmp_path / "timed", count=40, seed=1)
    per_image_ms = (time.perf_counter() - start) / 40 * 1000
    # about 6 ms on an idle core; the bound leaves room for a busy shared machine
    assert per_image_ms < 60, per_image_ms
