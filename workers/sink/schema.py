"""The one, versioned Arrow schema of the output dataset.

One row per plate found; one row (``status='no_plate'``) for an image with no plate; one row
(``status='failed'``) for an image that ended in an error, with its code and message. Metadata
columns from the source are carried in ``meta`` (a map), so the schema never changes with a
manifest's columns; ``carnumber compact`` also spreads them into ``meta_<name>`` columns.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["POLYGON", "SCHEMA", "SCHEMA_VERSION", "STATUS_FAILED", "STATUS_NO_PLATE", "STATUS_OK"]

SCHEMA_VERSION = 2  # 2: content_key, answered_by
STATUS_OK = "ok"
STATUS_NO_PLATE = "no_plate"
STATUS_FAILED = "failed"

POLYGON = pa.list_(pa.struct([("x", pa.int32()), ("y", pa.int32())]), 4)

SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # canonical, no signed query string
        pa.field("meta", pa.map_(pa.string(), pa.string())),
        pa.field("status", pa.string(), nullable=False),  # ok | no_plate | failed
        pa.field("plate_index", pa.int16()),  # 0.. within the image; null when no plate
        pa.field("plate", pa.string()),
        pa.field("plate_type", pa.string()),
        pa.field("plate_type_prob", pa.float32()),
        pa.field("plate_prob", pa.float32()),
        pa.field("polygon", POLYGON),  # TL, TR, BR, BL in original-image pixels
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("org_width", pa.int32()),
        pa.field("org_height", pa.int32()),
        pa.field("request_id", pa.string()),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("retryable", pa.bool_()),  # a failed row that a later retry may fix
        pa.field("attempts", pa.int16(), nullable=False),  # calls made for this image
        # What identifies the picture itself (workers/content.py); null when unknown.
        pa.field("content_key", pa.string()),
        # The image whose call produced this answer: itself, or an earlier copy of the same
        # picture in the run (that call answered both). Null for a failure refused locally.
        pa.field("answered_by", pa.string()),
        pa.field("processed_at", pa.timestamp("ms", tz="UTC"), nullable=False),
    ],
    metadata={b"carnumber.schema_version": str(SCHEMA_VERSION).encode()},
)
