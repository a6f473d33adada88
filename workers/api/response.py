"""Typed results, and the parser from RecognizeCarNumber's envelope to them.

The envelope's ``Data`` is a JSON *string*. Inside, ``structure_list`` holds one entry per plate,
and entries may be fastjson back-references such as ``{"$ref": "$.data"}``, which the parser
resolves. Anything that is not the documented shape (not JSON, an HTML page, no ``Data``, ``Data``
not JSON, a field of the wrong type) raises :class:`UnreadableAnswer` (``local.unreadableAnswer``)
carrying the start of the body, at most :data:`RAW_MAX_CHARS` characters with secrets scrubbed:
the call was answered and billed, and the same picture will most likely be answered the same way,
so the retry policy calls once more only (``ops/design/retries.md``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from workers.errors import UnreadableAnswer

__all__ = [
    "PLATE_KEY",
    "RAW_MAX_CHARS",
    "Plate",
    "Recognition",
    "parse_data",
    "parse_envelope",
    "scrub",
    "unreadable",
]

PLATE_KEY = "车牌"
# How much of an unreadable body is kept: enough to tell an HTML page, a cut-off envelope or a
# changed field from each other; an answer is 1-3 KiB.
RAW_MAX_CHARS = 1024
Point = tuple[int, int]
_REF_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
# A value named like a credential (query parameter, header or JSON field, plain or URL-encoded,
# as a gateway page may echo our request line or headers), and URL user info.
_SECRET_VALUE = re.compile(
    r"(?i)(signature|token|credential|secret|password|authorization)"
    r"(\\?[\"']?\s*(?:=|%3D|:)\s*\\?[\"']?)[^\s\"'&<>,;\\]+"
)
_USER_INFO = re.compile(r"(?i)(://|%3A%2F%2F)[^/\s\"'<>@]+?(?:@|%40)")


class _Shape(ValueError):
    """The body is not the documented envelope (internal: becomes :class:`UnreadableAnswer`)."""


@dataclass(frozen=True, slots=True)
class Plate:
    text: str
    prob: float | None = None
    plate_type: str | None = None
    type_prob: float | None = None
    polygon: tuple[Point, Point, Point, Point] | None = None  # TL, TR, BR, BL in the original image


@dataclass(frozen=True, slots=True)
class Recognition:
    request_id: str | None
    plates: tuple[Plate, ...] = ()
    width: int | None = None
    height: int | None = None
    org_width: int | None = None
    org_height: int | None = None
    score: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        # Spelled out: dataclasses.asdict deep-copies every field and was 75 % of the cost of
        # journalling an answer and of building the answer cache.
        return {
            "request_id": self.request_id,
            "plates": [
                {
                    "text": p.text,
                    "prob": p.prob,
                    "plate_type": p.plate_type,
                    "type_prob": p.type_prob,
                    "polygon": [list(pt) for pt in p.polygon] if p.polygon else None,
                }
                for p in self.plates
            ],
            "width": self.width,
            "height": self.height,
            "org_width": self.org_width,
            "org_height": self.org_height,
            "score": self.score,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Recognition:
        """The inverse of :meth:`to_json` (``raw`` is not kept)."""
        plates = tuple(
            Plate(
                text=p["text"],
                prob=p.get("prob"),
                plate_type=p.get("plate_type"),
                type_prob=p.get("type_prob"),
                polygon=tuple(tuple(pt) for pt in p["polygon"]) if p.get("polygon") else None,  # type: ignore[arg-type]
            )
            for p in doc.get("plates", ())
        )
        fields_ = ("request_id", "width", "height", "org_width", "org_height", "score")
        return cls(plates=plates, **{k: doc.get(k) for k in fields_})


def parse_envelope(
    body: Any,
    *,
    raw: bytes | str | None = None,
    request_id: str | None = None,
) -> Recognition:
    """Parse a success body (``RequestId`` + ``Data``) into a :class:`Recognition`.

    ``body``: the bytes or text as received, or the JSON already decoded from them (then ``raw``
    is the body as received, kept in the error). ``request_id``: the answer's
    ``x-acs-request-id``, used when the body has none. Raises :class:`UnreadableAnswer`.
    """
    try:
        envelope = _load(body, "response body") if isinstance(body, (bytes, str)) else body
        if not isinstance(envelope, dict):
            raise _Shape("response body is not a JSON object")
        found = envelope.get("RequestId") or envelope.get("requestId")
        request_id = str(found) if found is not None else request_id
        data = envelope.get("Data", envelope.get("data"))
        if data is None:
            raise _Shape("response has no Data field")
        return _parse_data(data, request_id)
    except _Shape as exc:
        kept = raw if raw is not None else body
        raise unreadable(str(exc), kept, request_id=request_id) from None


def parse_data(data: str | dict[str, Any], request_id: str | None = None) -> Recognition:
    """Parse ``Data`` alone (the official SDK hands it over decoded from the envelope).
    Raises :class:`UnreadableAnswer` keeping the start of ``data``."""
    try:
        return _parse_data(data, request_id)
    except _Shape as exc:
        raise unreadable(str(exc), data, request_id=request_id) from None


def unreadable(
    reason: str, body: Any, *, status: int = 200, request_id: str | None = None
) -> UnreadableAnswer:
    """The :class:`UnreadableAnswer` for ``body`` (bytes, text or decoded JSON): ``reason`` says
    what is wrong; the error keeps at most :data:`RAW_MAX_CHARS` characters of it, scrubbed."""
    if isinstance(body, bytes):
        size = len(body)
        # Decode only what can be kept: a multi-megabyte page costs no more than a short one.
        text = body[: RAW_MAX_CHARS * 4].decode("utf-8", "replace")
    else:
        text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False, default=repr)
        size = len(text.encode("utf-8", "replace"))
    return UnreadableAnswer(reason, scrub(text[:RAW_MAX_CHARS]), size, status, request_id)


def scrub(text: str) -> str:
    """``text`` with every value named like a credential (``Signature=``, ``security-token:``,
    ``"AccessKeySecret":``, URL-encoded too) and URL user info replaced by ``***``."""
    text = _SECRET_VALUE.sub(r"\1\2***", text)
    return _USER_INFO.sub(r"\1***@", text)


def _parse_data(data: Any, request_id: str | None) -> Recognition:
    doc: Any = data
    # Data is a JSON string; some published examples quote it twice.
    for _ in range(3):
        if not isinstance(doc, str):
            break
        doc = _load(doc, "Data")
    if not isinstance(doc, dict):
        raise _Shape("Data is not a JSON object")
    try:
        plates = tuple(_plates(doc))
        return Recognition(
            request_id=request_id,
            plates=plates,
            width=_int(doc.get("width")),
            height=_int(doc.get("height")),
            org_width=_int(doc.get("orgWidth")),
            org_height=_int(doc.get("orgHeight")),
            score=_float((doc.get("data") or {}).get("score")),
            raw=doc,
        )
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise _Shape(f"Data does not have the documented shape ({type(exc).__name__}: {exc})") from None


def _load(text: bytes | str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise _Shape(f"{what} is not valid JSON") from None


def _resolve(root: dict[str, Any], node: Any, depth: int = 0) -> Any:
    """Follow fastjson ``{"$ref": "$.a.b[0]"}`` references from the document root."""
    while isinstance(node, dict) and set(node) == {"$ref"}:
        ref = node["$ref"]
        if not isinstance(ref, str) or not ref.startswith("$") or depth > 8:
            raise ValueError(f"unsupported reference {ref!r}")
        target: Any = root
        for name, index in _REF_STEP.findall(ref[1:]):
            target = target[int(index)] if index else target[name]
        node, depth = target, depth + 1
    return node


def _plates(doc: dict[str, Any]) -> list[Plate]:
    structures = [_resolve(doc, s) for s in doc.get("structure_list") or []]
    if not structures and isinstance(doc.get("data"), dict):
        structures = [doc["data"]]
    prism = doc.get("prism_keyValueInfo") or []
    plates = []
    for i, s in enumerate(structures):
        plate = _plate(s, prism[i] if i < len(prism) else None)
        if plate is not None:
            plates.append(plate)
    return plates


def _plate(s: dict[str, Any], prism: dict[str, Any] | None) -> Plate | None:
    info = next((i for i in s.get("info") or [] if i.get("key") in (PLATE_KEY, None)), None)
    text = (s.get("data") or {}).get(PLATE_KEY) or (info or {}).get("value")
    if not text:
        return None
    cls = s.get("secondary_cls") or {}
    polygon = _polygon_from_loc((info or {}).get("value_loc"))
    if polygon is None and prism and prism.get("value") == text:
        polygon = _polygon_from_points(prism.get("valuePos"))
    prob = _float((info or {}).get("value_prob"))
    if prob is None and prism and prism.get("valueProb") is not None:
        prob = float(prism["valueProb"]) / 100.0
    return Plate(
        text=_text(text),
        prob=prob,
        plate_type=_text(cls.get("type_str")),
        type_prob=_float(cls.get("prob")),
        polygon=polygon,
    )


def _polygon_from_loc(loc: Any) -> tuple[Point, Point, Point, Point] | None:
    if not loc or not isinstance(loc, str):
        return None
    nums = [round(float(v)) for v in loc.split(",")]
    if len(nums) != 8:
        raise ValueError(f"value_loc has {len(nums)} numbers, not 8")
    pts = [(nums[i], nums[i + 1]) for i in range(0, 8, 2)]
    return (pts[0], pts[1], pts[2], pts[3])


def _polygon_from_points(points: Any) -> tuple[Point, Point, Point, Point] | None:
    if not points or len(points) != 4:
        return None
    pts = [(round(float(p["x"])), round(float(p["y"]))) for p in points]
    return (pts[0], pts[1], pts[2], pts[3])


def _text(v: Any) -> str | None:
    # A number or a list where the documented answer has text would reach the output's string
    # columns and fail the whole part's write: refuse it here, for this answer only.
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise TypeError(f"{type(v).__name__} where text was expected")
    return v


def _int(v: Any) -> int | None:
    return None if v is None or v == "" else int(v)


def _float(v: Any) -> float | None:
    return None if v is None or v == "" else float(v)
