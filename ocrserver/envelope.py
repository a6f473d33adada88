"""The success envelope, shaped exactly like the product page's example.

::

    {"RequestId": "...", "Data": "<JSON string>"}

and inside ``Data`` (key order as in the example)::

    {"data": {"secondary_cls": {"type_str", "prob"}, "data": {"车牌": text}, "score",
              "info": [{"value", "key", "key_prob", "value_prob", "key_loc", "value_loc"}]},
     "height", "orgHeight", "orgWidth",
     "prism_keyValueInfo": [{"key", "keyProb", "value", "valuePos": [{"x","y"} x4], "valueProb"}],
     "structure_list": [{"$ref": "$.data"}, <plate 2>, ...],
     "width"}

``data`` describes the first plate; ``structure_list`` has one entry per plate, the first being the
fastjson back-reference to ``data`` (or a full copy with ``expand_refs``). With no plate the
answer is still a success: ``data`` is ``{}`` and both lists are empty. Probabilities are rounded
to 6 decimals; ``keyProb``/``valueProb`` are integer percentages (truncated, as 0.99926 -> 99).
``score`` is synthetic (text confidence + 0.05, as in the example's 1.05).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ocrserver.recognizers.base import DetectedPlate

__all__ = ["PLATE_KEY", "data_document", "success_body"]

PLATE_KEY = "车牌"


def _r(x: float) -> float:
    return round(float(x), 6)


def _pct(x: float) -> int:
    return max(0, min(100, int(float(x) * 100)))


def _structure(p: DetectedPlate) -> dict[str, Any]:
    loc = ",".join(f"{x},{y}" for x, y in p.polygon)
    return {
        "secondary_cls": {"type_str": p.plate_type, "prob": _r(p.type_prob)},
        "data": {PLATE_KEY: p.text},
        "score": _r(min(p.prob, 1.0) + 0.05),
        "info": [
            {
                "value": p.text,
                "key": PLATE_KEY,
                "key_prob": _r(p.key_prob),
                "value_prob": _r(p.prob),
                "key_loc": "",
                "value_loc": loc,
            }
        ],
    }


def _prism(p: DetectedPlate) -> dict[str, Any]:
    return {
        "key": PLATE_KEY,
        "keyProb": _pct(p.key_prob),
        "value": p.text,
        "valuePos": [{"x": x, "y": y} for x, y in p.polygon],
        "valueProb": _pct(p.prob),
    }


def data_document(
    plates: Sequence[DetectedPlate], width: int, height: int, expand_refs: bool = False
) -> dict[str, Any]:
    """The object serialised into ``Data``; sizes in pixels of the original image."""
    structures = [_structure(p) for p in plates]
    listed: list[Any] = list(structures)
    if structures and not expand_refs:
        listed[0] = {"$ref": "$.data"}
    return {
        "data": structures[0] if structures else {},
        "height": height,
        "orgHeight": height,
        "orgWidth": width,
        "prism_keyValueInfo": [_prism(p) for p in plates],
        "structure_list": listed,
        "width": width,
    }


def success_body(
    request_id: str,
    plates: Sequence[DetectedPlate],
    width: int,
    height: int,
    expand_refs: bool = False,
) -> bytes:
    """The UTF-8 JSON body of a successful answer."""
    data = json.dumps(
        data_document(plates, width, height, expand_refs), ensure_ascii=False, separators=(",", ":")
    )
    return json.dumps(
        {"RequestId": request_id, "Data": data}, ensure_ascii=False, separators=(",", ":")
    ).encode("utf-8")
