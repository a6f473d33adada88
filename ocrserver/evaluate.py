"""``carnumber eval``: measure the offline recognizer on a labelled set of plate photos.

The set is a directory with ``labels.csv`` (columns ``file, plate, ..., notes``; ``notes`` is
``key=value; ...`` with ``subset=scene|crop`` and ``type=blue|green|yellow_single|...``) and
the images under ``images/``; one row per plate, so an image may have several rows. Default:
``../shared/eval/plates`` beside the repository.

Scoring, per labelled plate: the recognizer's plates of that image are matched to the labels
greedily by character accuracy (1 − edit distance / label length, floored at 0). A label counts
as *detected* when its match reaches 0.5 character accuracy, as *exact* when the strings are
equal; a predicted plate matched to no label is a *false detection*. *Type accuracy* is over
exact reads whose label category has a product class. Latency is one image at a time on one
thread; images/s runs ``recognize_batch`` over all images with every worker (best of three
passes).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workers.errors import ConfigError, InputError

__all__ = ["EXPECTED_TYPE", "Sample", "add_arguments", "char_accuracy", "evaluate", "load_samples", "main"]

# label type -> report category
CATEGORY = {
    "blue": "blue",
    "green": "green",
    "yellow_single": "yellow",
    "yellow_learner": "yellow",
    "black": "black",
    "yellow_double": "double-row",
}
# label type -> the product class a correct reader should give (None: no class fits)
EXPECTED_TYPE: dict[str, str | None] = {
    "blue": "小型汽车",
    "green": "新能源车",
    "yellow_single": "大型汽车",
    "yellow_double": "大型汽车",
    "yellow_learner": "教练车",
    "black": None,
    "special_police": "警车",
    "special_consulate": "使领馆车",
    "special_embassy": "使领馆车",
    "special_hk_macau": "港澳车",
    "special_military": "军车",
    "special_civil_aviation": None,
    "special_farm_double": None,
}
STANDARD = ("blue", "green", "yellow", "black", "double-row")


@dataclass(frozen=True, slots=True)
class Sample:
    """One labelled image: its file, subset (scene|crop) and the labelled plates (text, type)."""

    path: Path
    subset: str
    plates: tuple[tuple[str, str], ...]


@dataclass(slots=True)
class PlateResult:
    file: str
    subset: str
    category: str
    label: str
    read: str | None
    char_acc: float
    type_expected: str | None
    type_read: str | None


@dataclass(slots=True)
class Report:
    plates: list[PlateResult] = field(default_factory=list)
    false_by_subset: dict[str, int] = field(default_factory=dict)
    images_by_subset: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, list[float]] = field(default_factory=dict)
    images_per_s: dict[str, float] = field(default_factory=dict)


def _notes(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def load_samples(data_dir: Path) -> list[Sample]:
    """The labelled images of ``data_dir`` (labels.csv + images/), in file order.

    Raises :class:`InputError` when the directory or its labels are missing.
    """
    labels = data_dir / "labels.csv"
    if not labels.is_file():
        raise InputError(f"{data_dir}: no labels.csv (expected an eval set like ../shared/eval/plates)")
    grouped: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    with labels.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            notes = _notes(row.get("notes") or "")
            entry = grouped.setdefault(row["file"], (notes.get("subset", "scene"), []))
            entry[1].append((row["plate"], notes.get("type", "blue")))
    return [
        Sample(data_dir / "images" / name, subset, tuple(plates))
        for name, (subset, plates) in sorted(grouped.items())
    ]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(label: str, read: str | None) -> float:
    """1 − edit distance / label length, floored at 0 (0 for no read)."""
    if not read or not label:
        return 0.0
    return max(0.0, 1.0 - edit_distance(label, read) / len(label))


def category_of(label_type: str) -> str:
    return CATEGORY.get(label_type, "special")


def score_image(sample: Sample, predictions: Sequence[Any]) -> tuple[list[PlateResult], int]:
    """Match one image's predictions (objects with ``text``/``plate_type``) to its labels.

    Returns the per-label results and the number of false detections.
    """
    pairs = sorted(
        (
            (char_accuracy(label, pred.text), li, pi)
            for li, (label, _) in enumerate(sample.plates)
            for pi, pred in enumerate(predictions)
        ),
        reverse=True,
    )
    used_l: dict[int, int] = {}
    used_p: set[int] = set()
    for acc, li, pi in pairs:
        if li in used_l or pi in used_p or acc < 0.5:
            continue
        used_l[li] = pi
        used_p.add(pi)
    results = []
    for li, (label, label_type) in enumerate(sample.plates):
        pred = predictions[used_l[li]] if li in used_l else None
        results.append(
            PlateResult(
                file=sample.path.name,
                subset=sample.subset,
                category=category_of(label_type),
                label=label,
                read=pred.text if pred else None,
                char_acc=char_accuracy(label, pred.text if pred else None),
                type_expected=EXPECTED_TYPE.get(label_type),
                type_read=pred.plate_type if pred else None,
            )
        )
    return results, len(predictions) - len(used_p)


def evaluate(
    recognizer: Any,
    samples: Sequence[Sample],
    *,
    batch: int = 8,
    passes: int = 3,
    on_image: Callable[[int, int], None] | None = None,
) -> Report:
    """Run ``recognizer`` over ``samples`` and collect per-plate results and timings.

    Latency: one image at a time, each once. Images/s: ``recognize_batch`` over each subset in
    batches of ``batch``, ``passes`` times; the best pass counts. ``on_image(done, total)``
    follows the work (images, the throughput passes included).
    """
    total = len(samples) * (1 + passes)
    done = 0
    from ocrserver.recognizers.base import ImageInput

    inputs = [_input(s.path) for s in samples]
    report = Report()
    for sample, image in zip(samples, inputs, strict=True):
        start = time.perf_counter()
        predictions = recognizer.recognize(image)
        report.latency_ms.setdefault(sample.subset, []).append((time.perf_counter() - start) * 1e3)
        results, false = score_image(sample, predictions)
        report.plates.extend(results)
        report.false_by_subset[sample.subset] = report.false_by_subset.get(sample.subset, 0) + false
        report.images_by_subset[sample.subset] = report.images_by_subset.get(sample.subset, 0) + 1
        done += 1
        if on_image is not None:
            on_image(done, total)
    for subset in sorted({s.subset for s in samples}):
        subset_inputs: list[ImageInput] = [
            i for s, i in zip(samples, inputs, strict=True) if s.subset == subset
        ]
        rates = []
        for _ in range(passes):
            start = time.perf_counter()
            for k in range(0, len(subset_inputs), batch):
                recognizer.recognize_batch(subset_inputs[k : k + batch])
                done += len(subset_inputs[k : k + batch])
                if on_image is not None:
                    on_image(done, total)
            rates.append(len(subset_inputs) / (time.perf_counter() - start))
        # the least disturbed pass: on a shared machine the others measure the neighbours
        report.images_per_s[subset] = max(rates)
    return report


def _input(path: Path) -> Any:
    import hashlib

    from PIL import Image

    from ocrserver.recognizers.base import ImageInput

    data = path.read_bytes()
    with Image.open(path) as img:
        width, height = img.size
    return ImageInput(data, width, height, hashlib.sha256(data).hexdigest(), name=path.name)


def _row(name: str, plates: list[PlateResult], false: int, images: int,
         latency: list[float] | None, ips: float | None) -> list[str]:
    n = len(plates)
    exact = sum(p.read == p.label for p in plates)
    detected = sum(p.read is not None for p in plates)
    typed = [p for p in plates if p.read == p.label and p.type_expected]
    type_ok = sum(p.type_read == p.type_expected for p in typed)
    lat = sorted(latency or [])
    p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))] if lat else None
    return [
        name,
        str(n),
        f"{exact}/{n} {100 * exact / n:.1f}%" if n else "-",
        f"{100 * statistics.fmean(p.char_acc for p in plates):.1f}%" if n else "-",
        f"{100 * detected / n:.1f}%" if n else "-",
        f"{false / images:.2f}" if images else "-",
        f"{type_ok}/{len(typed)} {100 * type_ok / len(typed):.1f}%" if typed else "-",
        f"{statistics.fmean(lat):.1f}" if lat else "-",
        f"{p95:.1f}" if p95 is not None else "-",
        f"{ips:.1f}" if ips else "-",
    ]


def table(report: Report) -> str:
    """The report as a Markdown table: per category, scenes and crops apart, then totals."""
    head = ["set", "plates", "exact", "char acc", "detected", "false/img", "type ok",
            "lat ms", "p95 ms", "img/s"]
    rows: list[list[str]] = []
    for subset in ("scene", "crop"):
        plates = [p for p in report.plates if p.subset == subset]
        if not plates:
            continue
        cats = sorted({p.category for p in plates}, key=lambda c: (*STANDARD, "special").index(c))
        for cat in cats:
            rows.append(_row(f"{subset} {cat}", [p for p in plates if p.category == cat],
                             0, 0, None, None))
        if subset == "scene":
            std = [p for p in plates if p.category in STANDARD]
            rows.append(_row("scene standard", std, 0, 0, None, None))
        rows.append(_row(f"{subset} all", plates, report.false_by_subset.get(subset, 0),
                         report.images_by_subset.get(subset, 0), report.latency_ms.get(subset),
                         report.images_per_s.get(subset)))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def errors(report: Report) -> Iterable[str]:
    for p in report.plates:
        if p.read != p.label or (p.type_expected and p.type_read != p.type_expected):
            yield f"{p.file}\t{p.category}\tlabel={p.label}\tread={p.read}\ttype={p.type_read}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=None,
                        help="eval set (labels.csv + images/); default ../shared/eval/plates")
    parser.add_argument("--model-dir", default=None,
                        help="ONNX model directory (default CARNUMBER_MODEL_DIR, else vendored)")
    parser.add_argument("--workers", type=int, default=None,
                        help="threads for the images/s run (default: CPUs)")
    parser.add_argument("--subset", choices=("scene", "crop"), default=None, help="only this subset")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of each subset")
    parser.add_argument("--errors", action="store_true", help="list every plate read wrongly")
    parser.add_argument("--json", type=Path, default=None, help="also write per-plate results here")


def default_data_dir() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "shared" / "eval" / "plates"


def main(args: argparse.Namespace, on_image: Callable[[int, int], None] | None = None) -> int:
    """``carnumber eval``; ``on_image(done, total)`` follows the work (a progress bar)."""
    from ocrserver.recognizers.onnx import OnnxRecognizer

    data = args.data or default_data_dir()
    samples = load_samples(data)
    if args.subset:
        samples = [s for s in samples if s.subset == args.subset]
    if args.limit:
        kept: dict[str, int] = {}
        limited = []
        for s in samples:
            kept[s.subset] = kept.get(s.subset, 0) + 1
            if kept[s.subset] <= args.limit:
                limited.append(s)
        samples = limited
    if not samples:
        raise ConfigError(f"{data}: no images selected")
    model_dir = args.model_dir or os.environ.get("CARNUMBER_MODEL_DIR") or None
    recognizer = OnnxRecognizer(model_dir, workers=args.workers)
    try:
        report = evaluate(recognizer, samples, on_image=on_image)
    finally:
        recognizer.close()
    print(f"eval set: {data} ({len(samples)} images, {len(report.plates)} plates), "
          f"workers={recognizer.workers}")
    print(table(report))
    if args.errors:
        for line in errors(report):
            print(line)
    if args.json:
        args.json.write_text(json.dumps([asdict(p) for p in report.plates], ensure_ascii=False, indent=1),
                             encoding="utf-8")
    return 0
