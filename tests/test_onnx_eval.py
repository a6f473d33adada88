"""``carnumber eval``: scoring rules on a made-up set, and a few real photos from ../shared."""

from __future__ import annotations

import argparse
import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from ocrserver import evaluate
from ocrserver.recognizers.onnx import OnnxRecognizer
from ocrserver.samples import generate_archive
from workers.errors import InputError


@dataclass
class _Pred:
    text: str
    plate_type: str


def test_char_accuracy_and_matching() -> None:
    assert evaluate.char_accuracy("皖A12345", "皖A12345") == 1.0
    assert evaluate.char_accuracy("皖A12345", "皖A1245") == pytest.approx(6 / 7)
    assert evaluate.char_accuracy("皖A12345", None) == 0.0
    assert evaluate.char_accuracy("AB", "XYZW") == 0.0
    sample = evaluate.Sample(Path("x.jpg"), "scene", (("浙B2V9L7", "blue"), ("辽DU4356", "blue")))
    preds = [_Pred("皖DU4356", "小型汽车"), _Pred("浙B2V9L7", "小型汽车"), _Pred("XX", "小型汽车")]
    results, false = evaluate.score_image(sample, preds)
    assert [r.read for r in results] == ["浙B2V9L7", "皖DU4356"]
    assert [r.char_acc for r in results] == [1.0, pytest.approx(6 / 7)]
    assert false == 1
    assert results[0].category == "blue" and results[0].type_expected == "小型汽车"
    assert evaluate.category_of("special_police") == "special"
    assert evaluate.category_of("yellow_double") == "double-row"


def _write_set(root: Path, rows: list[tuple[str, str, str]]) -> None:
    (root / "images").mkdir(parents=True)
    with (root / "labels.csv").open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "plate", "source_repo", "source_path", "notes"])
        for file, plate, notes in rows:
            w.writerow([file, plate, "", "", notes])


def test_eval_command_on_a_generated_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truths = generate_archive(tmp_path / "gen", count=4, seed=2)
    rows = []
    for s in truths:
        shutil.copy(tmp_path / "gen" / s.name, tmp_path / s.name)
        for p in s.plates:
            kind = {"小型汽车": "blue", "新能源车": "green", "大型汽车": "yellow_single"}.get(
                p.plate_type, "special_police")
            rows.append((s.name, p.text, f"type={kind}; subset=scene"))
    data = tmp_path / "set"
    _write_set(data, rows)
    for s in truths:
        shutil.move(tmp_path / s.name, data / "images" / s.name)
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    json_out = tmp_path / "results.json"
    assert evaluate.main(parser.parse_args(["--data", str(data), "--workers", "2", "--json", str(json_out),
                                            "--errors"])) == 0
    out = capsys.readouterr().out
    assert "| scene all |" in out and "img/s" in out
    assert json_out.is_file() and '"label"' in json_out.read_text(encoding="utf-8")


def test_missing_set_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"labels\.csv"):
        evaluate.load_samples(tmp_path)


def test_a_few_real_photos(shared_dir: Path) -> None:
    data = shared_dir / "eval" / "plates"
    samples = evaluate.load_samples(data)
    assert len(samples) >= 200
    chosen = [s for s in samples if s.path.name in {
        "s000_ZhijuCen.jpg", "s026_zjykzj.jpg", "s047_we0091234.jpg", "s054_zeusees.jpg",
        "s074_sakurasep.jpg", "c006_siriusai.jpg", "c007_siriusai.jpg", "c001_szad670401.jpg",
    }]
    assert len(chosen) == 8
    recognizer = OnnxRecognizer(workers=2)
    try:
        report = evaluate.evaluate(recognizer, chosen)
    finally:
        recognizer.close()
    exact = [p for p in report.plates if p.read == p.label]
    # blue, green, yellow, double-row scenes and blue/green crops: all read on this machine
    assert len(exact) >= 7, [(p.label, p.read) for p in report.plates]
    assert all(p.type_read == p.type_expected for p in exact if p.type_expected)
    assert "| scene all |" in evaluate.table(report)
