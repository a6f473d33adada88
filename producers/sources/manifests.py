"""Manifest sources: ``.txt``/``.lst`` (one entry a line), ``.csv``, ``.jsonl``, ``.parquet``.

An entry is a ``url`` (any source URI: ``https://``, ``s3://``, ``oss://``, ``file://``,
``tar://``, ``zip://``) or a ``path`` (a local file). CSV/JSONL/Parquet name it in a ``url``
or ``path`` column (either case; ``url`` wins when a row has both); every other column is
carried into ``ImageRef.meta`` as a string (nulls and empty strings left out). Plain lines are
URIs when they contain ``://``, paths otherwise; blank lines and ``#`` comments are ignored.

Rules, each broken line reported through ``on_skip`` (file and line number) and skipped:

* A relative path resolves against ``settings.source_root`` when set, else the manifest's own
  folder, and must stay inside it (``..`` and symlinks resolved). An absolute path (or
  ``file://``/``tar://``/``zip://`` URI) must be inside ``source_root`` when that is set.
* A URL carrying signature or credential parameters (``X-Amz-Signature``, ``OSSAccessKeyId``,
  ``Signature``, ``security-token``...) is refused: it would put a secret into task messages and
  output files, and it expires before a nightly re-run. List ``s3://bucket/key`` or
  ``oss://bucket/key`` instead; workers sign at call time.
* Lines are read in file order (streamed; Parquet in batches of 8192 rows), so memory stays flat.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator
from datetime import date, datetime
from typing import Any

from producers.sources.filters import Filter, inside
from workers.config import Settings
from workers.errors import InputError
from workers.message import ImageRef, has_secret_params
from workers.storage.uris import archive_uri, file_uri, object_uri, parse_uri

__all__ = ["MANIFEST_SUFFIXES", "iter_manifest"]

MANIFEST_SUFFIXES = (".txt", ".lst", ".csv", ".jsonl", ".ndjson", ".parquet")
_URL_KEYS = ("url", "URL", "Url")
_PATH_KEYS = ("path", "PATH", "Path")
_BATCH_ROWS = 8192

Skip = Callable[[InputError], None]


class _Entries:
    """Turns one manifest entry into a canonical :class:`ImageRef` (or an :class:`InputError`)."""

    def __init__(self, manifest: str, settings: Settings, flt: Filter) -> None:
        self.manifest = manifest
        self.source_root = settings.source_root
        self.root = os.path.abspath(settings.source_root or os.path.dirname(manifest))
        self.flt = flt

    def ref(self, value: str, is_url: bool, meta: dict[str, str]) -> ImageRef | None:
        value = value.strip()
        if not value:
            raise InputError("empty url/path")
        source = self._source(value) if is_url or "://" in value else self._path(value)
        if self.flt.has_time and not self.flt.time_ok(source, None):
            return None
        return ImageRef(source, meta=meta)

    def _source(self, value: str) -> str:
        if "://" not in value:
            raise InputError(f"{value[:100]!r} is not a URL (use the path column for files)")
        if value.lower().startswith(("http://", "https://")):
            if has_secret_params(value):
                raise InputError(
                    "the URL carries signature/credential parameters; signed URLs expire and "
                    "must not be stored: list s3://bucket/key or oss://bucket/key instead "
                    "(workers sign at call time)"
                )
            return value
        loc = parse_uri(value)
        if loc.kind == "file":
            return file_uri(self._contained(loc.path, absolute_only=True))
        if loc.kind in ("tar", "zip"):
            return archive_uri(loc.kind, self._contained(loc.path, absolute_only=True), loc.member)
        return object_uri(loc.kind, loc.bucket, loc.key)

    def _path(self, value: str) -> str:
        return file_uri(self._contained(value, absolute_only=False))

    def _contained(self, value: str, absolute_only: bool) -> str:
        if os.path.isabs(value):
            path = os.path.normpath(value)
            if self.source_root is not None and not inside(self.root, path):
                raise InputError(f"{value!r} is outside CARNUMBER_SOURCE_ROOT")
            return path
        if absolute_only:
            raise InputError(f"{value!r}: URIs need absolute paths")
        path = os.path.normpath(os.path.join(self.root, value))
        if not inside(self.root, path):
            raise InputError(f"{value!r} escapes {self.root!r} ('..' or a symlink)")
        return path


def _meta(row: dict[str, Any], skip: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in row.items():
        if k in skip or v is None or v == "":
            continue
        out[str(k)] = _text(v)
    return out


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, datetime | date):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, dict | list):
        return json.dumps(v, ensure_ascii=False, separators=(",", ":"), default=str)
    return str(v)


def _pick(row: dict[str, Any]) -> tuple[str, bool]:
    for key in _URL_KEYS:
        if row.get(key) not in (None, ""):
            return str(row[key]), True
    for key in _PATH_KEYS:
        if row.get(key) not in (None, ""):
            return str(row[key]), False
    raise InputError("no url or path value")


def iter_manifest(path: str, settings: Settings, flt: Filter, on_skip: Skip) -> Iterator[ImageRef]:
    """Stream a manifest's entries as refs; bad lines go to ``on_skip`` (file:line: reason)."""
    path = os.path.abspath(path)
    entries = _Entries(path, settings, flt)
    lower = path.lower()
    if lower.endswith(".csv"):
        rows: Iterator[tuple[int, dict[str, Any] | InputError]] = _csv_rows(path)
    elif lower.endswith((".jsonl", ".ndjson")):
        rows = _jsonl_rows(path)
    elif lower.endswith(".parquet"):
        rows = _parquet_rows(path)
    else:
        rows = _line_rows(path)
    name = os.path.basename(path)
    for line, row in rows:
        try:
            if isinstance(row, InputError):
                raise row
            if "_line" in row:  # plain list: one value, URI or path
                ref = entries.ref(row["_line"], False, {})
            else:
                value, is_url = _pick(row)
                ref = entries.ref(value, is_url, _meta(row, _URL_KEYS + _PATH_KEYS))
        except InputError as exc:
            on_skip(InputError(f"{name}:{line}: {exc}"))
            continue
        if ref is not None:
            yield ref


def _line_rows(path: str) -> Iterator[tuple[int, dict[str, Any] | InputError]]:
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8").strip()
            except UnicodeDecodeError:
                yield n, InputError("not UTF-8")
                continue
            if text and not text.startswith("#"):
                yield n, {"_line": text}


def _csv_rows(path: str) -> Iterator[tuple[int, dict[str, Any] | InputError]]:
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise InputError(f"{path}: the CSV header does not parse ({exc})") from None
        header = [h.strip() for h in header]
        if not set(header) & set(_URL_KEYS + _PATH_KEYS):
            raise InputError(f"{path}: the CSV header needs a 'url' or 'path' column")
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield reader.line_num, InputError(f"does not parse ({exc})")
                continue
            line = reader.line_num
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                yield line, InputError(f"{len(fields)} fields, the header has {len(header)}")
            elif any(_has_surrogates(f) for f in fields):
                yield line, InputError("not UTF-8")
            else:
                yield line, dict(zip(header, fields, strict=True))


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _jsonl_rows(path: str) -> Iterator[tuple[int, dict[str, Any] | InputError]]:
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                yield n, InputError(f"not JSON ({type(exc).__name__})")
                continue
            if not isinstance(row, dict):
                yield n, InputError("not a JSON object")
            else:
                yield n, row


def _parquet_rows(path: str) -> Iterator[tuple[int, dict[str, Any] | InputError]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for a bad file
        raise InputError(f"{path}: not a readable Parquet file ({type(exc).__name__})") from None
    with pf:
        names = set(pf.schema_arrow.names)
        if not names & set(_URL_KEYS + _PATH_KEYS):
            raise InputError(f"{path}: the Parquet file needs a 'url' or 'path' column")
        n = 0
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS):
            for row in batch.to_pylist():
                n += 1
                yield n, row
