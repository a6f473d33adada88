"""The replay recognizer: answers from known truth instead of a model.

Lookup order for each image:

1. truth embedded in the image itself (see :mod:`ocrserver.truth`);
2. the ``--truth`` sidecar, a JSONL file whose lines are
   ``{"sha256": "<hex of the image bytes>", "plates": [...]}`` or ``{"name": "<file name>",
   "plates": [...]}`` (the name is matched against the last path segment of a ``Url`` image);
3. otherwise no plate.

Plates are truth entries ``{"text", "type", "polygon", "prob"}``; a sidecar plate without a
polygon gets a box in the middle of the image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from ocrserver.recognizers.base import DetectedPlate, ImageInput, Recognizer
from ocrserver.truth import plate_from_json, read_truth
from workers.errors import ConfigError

__all__ = ["ReplayRecognizer", "load_sidecar"]


def load_sidecar(path: str | Path) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """(by sha256, by name) raw plate lists from a JSONL truth file.

    Raises :class:`ConfigError` naming the file and line when it is missing or malformed.
    """
    by_sha: dict[str, list[Any]] = {}
    by_name: dict[str, list[Any]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"--truth {path}: cannot read ({exc.strerror or exc})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            plates = doc["plates"]
            if not isinstance(plates, list):
                raise TypeError("plates is not a list")
            if doc.get("sha256"):
                by_sha[str(doc["sha256"]).lower()] = plates
            elif doc.get("name"):
                by_name[str(doc["name"])] = plates
            else:
                raise KeyError("sha256 or name")
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--truth {path} line {n}: not a truth record ({exc})") from None
    return by_sha, by_name


class ReplayRecognizer(Recognizer):
    name: ClassVar[str] = "replay"
    inline: ClassVar[bool] = True  # microseconds per call: run on the event loop

    def __init__(self, truth_path: str | None = None) -> None:
        self.truth_path = truth_path
        self._by_sha, self._by_name = load_sidecar(truth_path) if truth_path else ({}, {})

    def recognize(self, image: ImageInput) -> list[DetectedPlate]:
        embedded = read_truth(image.data)
        if embedded is not None:
            return embedded
        raw = self._by_sha.get(image.sha256)
        if raw is None and image.name:
            raw = self._by_name.get(image.name)
        if not raw:
            return []
        w, h = image.width, image.height
        box = (w // 4, int(h * 0.4), w * 3 // 4, int(h * 0.6))
        plates = []
        for item in raw:
            try:
                plates.append(plate_from_json(item, box))
            except (ValueError, TypeError, KeyError, IndexError):
                continue  # a bad sidecar entry reads as no plate, not a server error
        return plates
