"""Turn the outcome of one image into output rows (plain dicts in :data:`SCHEMA`'s shape)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from workers.api.response import Plate, Recognition
from workers.message import ImageRef, redact_url
from workers.sink.schema import STATUS_FAILED, STATUS_NO_PLATE, STATUS_OK

__all__ = ["Failure", "failure_rows", "recognition_from_rows", "recognition_rows"]


@dataclass(frozen=True, slots=True)
class Failure:
    """A terminal error for one image: its code, message, and whether a later retry may help."""

    code: str
    message: str
    retryable: bool
    status: int | None = None
    request_id: str | None = None


def _base(
    run_id: str,
    ref: ImageRef,
    attempts: int,
    now: datetime | None,
    content_key: str | None,
    answered_by: str | None,
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "image_id": ref.image_id,
        "source": redact_url(ref.source),
        "meta": list(ref.meta.items()) or None,
        "attempts": attempts,
        "processed_at": now or datetime.now(UTC),
        "content_key": content_key,
        "answered_by": answered_by,
    }


def recognition_rows(
    run_id: str,
    ref: ImageRef,
    rec: Recognition,
    attempts: int,
    now: datetime | None = None,
    *,
    content_key: str | None = None,
    answered_by: str | None = None,
) -> list[dict[str, Any]]:
    """One row per plate, or one ``no_plate`` row. ``answered_by``: the image whose call
    answered (default: this one)."""
    base = _base(run_id, ref, attempts, now, content_key, answered_by or ref.image_id)
    sizes = {
        "width": rec.width,
        "height": rec.height,
        "org_width": rec.org_width,
        "org_height": rec.org_height,
        "request_id": rec.request_id,
    }
    if not rec.plates:
        return [{**base, **sizes, "status": STATUS_NO_PLATE}]
    return [
        {
            **base,
            **sizes,
            "status": STATUS_OK,
            "plate_index": i,
            "plate": p.text,
            "plate_type": p.plate_type,
            "plate_type_prob": p.type_prob,
            "plate_prob": p.prob,
            "polygon": [{"x": x, "y": y} for x, y in p.polygon] if p.polygon else None,
        }
        for i, p in enumerate(rec.plates)
    ]


def recognition_from_rows(rows: list[dict[str, Any]]) -> Recognition:
    """The recognition that :func:`recognition_rows` wrote as ``rows`` (one image's ``ok`` rows,
    or its ``no_plate`` row): what the answer cache across runs keeps. ``score`` and the raw
    body are not in the rows."""
    first = rows[0]
    plates = tuple(
        Plate(
            text=r["plate"],
            prob=r["plate_prob"],
            plate_type=r["plate_type"],
            type_prob=r["plate_type_prob"],
            polygon=tuple((p["x"], p["y"]) for p in r["polygon"]) if r["polygon"] else None,  # type: ignore[arg-type]
        )
        for r in sorted((r for r in rows if r["status"] == STATUS_OK), key=lambda r: r["plate_index"])
    )
    return Recognition(
        request_id=first["request_id"],
        plates=plates,
        width=first["width"],
        height=first["height"],
        org_width=first["org_width"],
        org_height=first["org_height"],
    )


def failure_rows(
    run_id: str,
    ref: ImageRef,
    failure: Failure,
    attempts: int,
    now: datetime | None = None,
    *,
    content_key: str | None = None,
    answered_by: str | None = None,
) -> list[dict[str, Any]]:
    """The single ``failed`` row of an image; the message is cut to 500 characters.
    ``answered_by``: set when the service gave this failure (a call was made)."""
    return [
        {
            **_base(run_id, ref, attempts, now, content_key, answered_by),
            "status": STATUS_FAILED,
            "error_code": failure.code,
            "error_message": failure.message[:500],
            "retryable": failure.retryable,
            "request_id": failure.request_id,
        }
    ]
