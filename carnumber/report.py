"""The morning summary of a run (``carnumber report RUN_ID``), as plain data.

Reads the output Parquet (small columns only: ids, status, codes, plate type, attempts, times;
one outcome per image exactly as ``carnumber compact`` picks it, see
:func:`workers.sink.compact.best_outcomes`) and the run's hash in Redis (calls counted once per
written part, creation time, state); throttled answers come from the account's per-minute call
counters over the run's time span (kept a day; account-wide, so another run at the same time
counts too). :func:`failure_rows` lists the failed images for ``--failures FILE.csv``.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.compute as pc

from workers.sink.compact import best_outcomes, read_keys
from workers.sink.dataset import Dataset
from workers.sink.schema import STATUS_FAILED, STATUS_NO_PLATE, STATUS_OK

__all__ = ["FAILURE_COLUMNS", "CodeCount", "RunReport", "build_report", "hint", "write_failures"]

FAILURE_COLUMNS = ("image_id", "source", "code", "message", "retryable")
_EXTRA = ("source", "error_code", "error_message", "retryable", "plate_type", "attempts", "answered_by")

# One line of advice per common code (exact match first, then the family prefix).
_HINTS: dict[str, str] = {
    "Throttling": "the service refused the rate: set CARNUMBER_QPS to the account's real limit; "
    "carnumber retry-failures redoes these",
    "InternalError": "a service-side error; carnumber retry-failures redoes these",
    "ServiceUnavailable": "the service was down for a while; carnumber retry-failures redoes these",
    "algorithmError": "the recognizer failed on the image; usually passes on a retry",
    "AlgorithmTimeout": "the recognizer took too long; usually passes on a retry",
    "ServiceTimeout": "the service took too long; usually passes on a retry",
    "imageTimeOut": "the service timed out fetching the image: check that the bucket is reachable "
    "from Alibaba Cloud, or use CARNUMBER_S3_MODE/OSS_MODE=bytes",
    "IllegalImageUrl": "the service could not fetch the URL: expired signature "
    "(CARNUMBER_SIGNED_URL_TTL_S) or a private bucket; try the bytes mode",
    "unsupportedImageFormat": "not an image the API reads (JPEG, PNG, BMP, GIF, ...): final, fix the archive",
    "illegalImageSize": "width or height outside what the API accepts: final",
    "exceededImageContent": "image too large for the API: set CARNUMBER_REENCODE_ABOVE_BYTES",
    "local.timeout": "no answer within CARNUMBER_READ_TIMEOUT_S; retryable",
    "local.connection": "could not reach the endpoint (network, DNS, TLS); retryable",
    "local.malformed": "the answer could not be parsed; retryable",
    "local.unreadableAnswer": "an HTTP 200 that is not the documented answer (billed, retried once "
    "at most); error_message shows how it began; carnumber retry-failures redoes these",
    "local.unsupportedFormat": "refused before calling: not an image format the API reads; final",
    "local.corruptImage": "refused before calling: the file is not a decodable image; final",
    "local.truncatedImage": "refused before calling: the file is cut short; final",
    "local.emptyImage": "refused before calling: an empty file; final",
    "local.imageTooLarge": "refused before calling: over the API's 10 MiB (read from the size, so "
    "re-encoding cannot help); shrink it at the source",
    "local.imageTooSmall": "refused before calling: below the API's minimum size; final",
    # Untrusted input (ops/design/sources.md, README "Local codes"): 0 calls each.
    "local.imageDimensionTooLarge": "refused before calling: a side of 8192 px or more; final",
    "local.aspectRatio": "refused before calling: long side / short side of 50 or more; final",
    "local.decode": "the pixels do not decode (found re-encoding): the file is damaged inside; final",
    "local.archive": "an archive member that cannot be read (encrypted, corrupt, a link, a repeated "
    "name, the archive cut short): error_message names it; copy the archive again",
    "local.link": "a symlink pointing out of the folder, not followed: copy its target in",
    "local.input": "missing file, member or object, or a pipe/device named .jpg: check the path",
    "local.name": "a hand-written URI whose escapes name no file: fix the manifest line",
    "local.manifest": "a manifest line that names no usable image (file:line: reason): fix the line",
    "local.outsideRoot": "a manifest path outside its folder or CARNUMBER_SOURCE_ROOT: move the file",
    "local.urlExpired": "the signed URL expired before its call: list it signed anew, or list "
    "s3://, oss:// objects (signed at each attempt)",
    "local.urlTooLong": "the URL is over 2048 bytes: list the object as s3:// or oss:// instead",
    "local.illegalUrl": "not an http(s) URL the service can fetch: list the object instead",
    "local.sealedUrlMissing": "the URL as listed was no longer in Redis: enqueue the manifest again",
    "local.accessDenied": "the store denied this object (its bucket was readable): fix its ACL",
    "local.objectChanged": "the object was overwritten during its checks; carnumber retry-failures",
    "local.objectChanging": "the object was overwritten under each call; carnumber retry-failures",
    "local.internal": "a bug cost this image (retryable): report it with error_message",
    "local.storageCredentials": "the object store refused our key (expired token, rotated key, "
    "clock skew, bucket denied): the fleet stopped; fix it, then carnumber resume",
    "local.read": "the image could not be read from its source (permissions, missing object)",
    "local.storage": "the image's storage refused the read (credentials, missing object)",
}


def hint(code: str) -> str:
    """One line on what the code means and what to do; empty when there is none."""
    if code in _HINTS:
        return _HINTS[code]
    for prefix, text in _HINTS.items():
        if code.lower().startswith(prefix.lower()):
            return text
    return ""


@dataclass(frozen=True, slots=True)
class CodeCount:
    code: str
    images: int
    retryable: bool
    hint: str


@dataclass(frozen=True, slots=True)
class RunReport:
    """The summary. Times are Unix seconds; ``None`` where not known."""

    run_id: str
    state: str
    source: str
    images: int
    by_outcome: dict[str, int]
    failures: list[CodeCount]
    plates: int
    plates_by_type: dict[str, int]
    calls: int
    calls_per_image: float | None
    throttled: int | None
    qps_limit: float
    calls_per_s: float | None
    started_at_s: float | None
    finished_at_s: float | None
    duration_s: float | None
    price_per_1000_calls: float | None
    cost: float | None
    enqueued: int | None = None
    parked: int | None = None
    # Images answered without a call of their own: a copy of a picture called earlier in the
    # run (the journal), or a picture an earlier run answered (the answer cache).
    copies_in_run: int = 0
    answered_earlier: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _float(fields: Mapping[str, str], name: str) -> float | None:
    try:
        return float(fields[name]) if fields.get(name) else None
    except ValueError:
        return None


def _winners(dataset: Dataset, run_id: str) -> tuple[pa.Table, pa.Table]:
    """(every row's small columns, the winning row per image)."""
    files = dataset.parquet_files(dataset.run_dir(run_id))
    keys, _ = read_keys(dataset, files, extra=_EXTRA)
    return keys, best_outcomes(keys)


def build_report(
    dataset: Dataset,
    run_id: str,
    run_fields: Mapping[str, str],
    *,
    qps_limit: float,
    price_per_1000_calls: float | None = None,
    throttled_between: Any = None,
) -> RunReport:
    """The report of ``run_id`` from its Parquet and its run hash ``run_fields`` (empty when the
    run is no longer in Redis). ``throttled_between(start_s, end_s)``: throttled answers in that
    span, or ``None`` when they cannot be counted."""
    keys, best = _winners(dataset, run_id)
    by_outcome = Counter({STATUS_OK: 0, STATUS_NO_PLATE: 0, STATUS_FAILED: 0})
    by_outcome.update(best["status"].to_pylist())
    failed = best.filter(pc.equal(best["status"], STATUS_FAILED))
    codes: Counter[tuple[str, bool]] = Counter(
        (row["error_code"] or "unknown", bool(row["retryable"]))
        for row in failed.select(["error_code", "retryable"]).to_pylist()
    )
    failures = [
        CodeCount(code, n, retryable, hint(code))
        for (code, retryable), n in sorted(codes.items(), key=lambda kv: (-kv[1], kv[0][0]))
    ]
    # Plates: every plate row of the winning part of each image.
    plates_tbl = keys.filter(pc.equal(keys["status"], STATUS_OK)).join(
        best.filter(pc.equal(best["status"], STATUS_OK)).select(["image_id", "file"]),
        keys=["image_id", "file"],
        join_type="inner",
    )
    plates_by_type = dict(
        sorted(
            Counter(t or "unknown" for t in plates_tbl["plate_type"].to_pylist()).items(),
            key=lambda kv: -kv[1],
        )
    )
    images = best.num_rows
    copies_in_run, answered_earlier = _answered_without_a_call(best)
    calls_field = run_fields.get("calls")
    if calls_field:
        calls = int(float(calls_field))
    else:  # no run hash: the attempts of each image in each part that answered for it
        per_part = keys.group_by(["image_id", "file"]).aggregate([("attempts", "max")])
        calls = int(pc.sum(per_part["attempts_max"]).as_py() or 0)
    started = _float(run_fields, "created_at")
    finished = None
    if keys.num_rows:
        finished = pc.max(keys["processed_at"]).as_py().timestamp()
        first = pc.min(keys["processed_at"]).as_py().timestamp()
        started = started if started is not None and started <= first else first
    duration = finished - started if started is not None and finished is not None else None
    throttled = throttled_between(started, finished) if throttled_between and duration else None
    cost = calls * price_per_1000_calls / 1000 if price_per_1000_calls is not None else None
    enqueued = run_fields.get("images_enqueued")
    parked = run_fields.get("images_parked")
    return RunReport(
        run_id=run_id,
        state=run_fields.get("state", "unknown (not in Redis)"),
        source=run_fields.get("source", ""),
        images=images,
        by_outcome=dict(by_outcome),
        failures=failures,
        plates=plates_tbl.num_rows,
        plates_by_type=plates_by_type,
        calls=calls,
        calls_per_image=calls / images if images else None,
        throttled=throttled,
        qps_limit=qps_limit,
        calls_per_s=calls / duration if duration else None,
        started_at_s=started,
        finished_at_s=finished,
        duration_s=duration,
        price_per_1000_calls=price_per_1000_calls,
        cost=cost,
        enqueued=int(enqueued) if enqueued else None,
        parked=int(parked) if parked else None,
        copies_in_run=copies_in_run,
        answered_earlier=answered_earlier,
    )


def _answered_without_a_call(best: pa.Table) -> tuple[int, int]:
    """(copies answered by another image of the run, images answered by an earlier run's)."""
    by = best["answered_by"]
    other = pc.and_(pc.is_valid(by), pc.not_equal(by, best["image_id"]))
    others = best.filter(pc.fill_null(other, False))
    in_run = pc.is_in(others["answered_by"], value_set=best["image_id"])
    copies = int(pc.sum(pc.cast(in_run, pa.int64())).as_py() or 0)
    return copies, others.num_rows - copies


def failure_rows(dataset: Dataset, run_id: str) -> Iterable[dict[str, Any]]:
    """The failed images (their final outcome), one dict per image with :data:`FAILURE_COLUMNS`."""
    _, best = _winners(dataset, run_id)
    failed = best.filter(pc.equal(best["status"], STATUS_FAILED))
    for row in failed.select(["image_id", "source", "error_code", "error_message", "retryable"]).to_pylist():
        yield {
            "image_id": row["image_id"],
            "source": row["source"],
            "code": row["error_code"] or "",
            "message": row["error_message"] or "",
            "retryable": "true" if row["retryable"] else "false",
        }


def write_failures(dataset: Dataset, run_id: str, out: TextIO) -> int:
    """Write the failed images as CSV (header :data:`FAILURE_COLUMNS`); returns how many."""
    writer = csv.DictWriter(out, fieldnames=FAILURE_COLUMNS)
    writer.writeheader()
    n = 0
    for row in failure_rows(dataset, run_id):
        writer.writerow(row)
        n += 1
    return n
