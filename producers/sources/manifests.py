"""Manifest sources: ``.txt``/``.lst`` (one entry a line), ``.csv``, ``.jsonl``, ``.parquet``.

An entry is a ``url`` (any source URI: ``https://``, ``s3://``, ``oss://``, ``file://``,
``tar://``, ``zip://``) or a ``path`` (a local file). CSV/JSONL/Parquet name it in a ``url``
or ``path`` column (either case; ``url`` wins when a row has both); every other column is
carried into ``ImageRef.meta`` as a string (nulls and empty strings left out). Plain lines are
URIs when they contain ``://``, paths otherwise; blank lines and ``#`` comments are ignored.

Every line that names an image is one item, so it gets exactly one row. A line that cannot become
a usable item is listed *refused* (``ImageRef.refused``: the worker writes that row and reads
nothing), with a code naming the rule and ``file:line`` in the message:

* ``local.manifest``: not UTF-8, not JSON, the wrong number of CSV fields, no url/path, not a
  URL, an unknown scheme, a field over 16 KiB (the row would carry it into every message and
  file); its source is the line itself (``manifest:///abs/m.csv#17``) unless it names an image.
* ``local.outsideRoot``: a relative path resolves against ``settings.source_root`` when set, else
  the manifest's own folder, and must stay inside it (``..`` and symlinks resolved); an absolute
  path (or ``file://``/``tar://``/``zip://`` URI) must be inside ``source_root`` when that is set.
* ``local.urlTooLong`` / ``local.urlExpired``: a URL the service would refuse, or whose signature
  has expired already.

An ``http(s)`` URL is known by its canonical source (:func:`workers.message.canonical_url`: only
the query parameters on ``CARNUMBER_KEEP_QUERY_PARAMS``, none by default), in messages, records
and output; its id is taken over the URL without its signature (:func:`redact_url`), so a link
signed anew each night keeps its id. When the canonical source dropped anything, the URL as listed
is sealed (``ImageRef.secret_url``, never on the wire): the producer keeps it in the sealed-URL
store and the worker fetches with it (``workers/storage/sealed.py``).

A line naming an image already listed (the same id) is not a new item: it is reported to
``on_skip`` and dropped (the ids seen are kept on disk: memory stays flat). Lines are read in
file order (streamed; Parquet in batches of 8192 rows); a file that breaks mid-way (a Parquet
row group that does not decode) ends with one refused item for its line.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import date, datetime
from typing import Any

from producers.sources.filters import Filter, inside
from producers.sources.seen import DigestSet
from workers.config import Settings
from workers.errors import ConfigError, ImageRejected, InputError
from workers.imagecheck import MAX_URL_BYTES
from workers.message import ImageRef, canonical_url, image_id_for, kept_params, signature_expiry
from workers.storage.uris import archive_uri, file_uri, manifest_line_uri, object_uri, parse_uri

__all__ = ["MANIFEST_SUFFIXES", "iter_manifest"]

MANIFEST_SUFFIXES = (".txt", ".lst", ".csv", ".jsonl", ".ndjson", ".parquet")
_URL_KEYS = ("url", "URL", "Url")
_PATH_KEYS = ("path", "PATH", "Path")
_BATCH_ROWS = 8192
MAX_FIELD_BYTES = 16_384  # one metadata value; more would ride in every message and row

Skip = Callable[[InputError], None]
log = logging.getLogger(__name__)


class _Entries:
    """Turns one manifest entry into a canonical :class:`ImageRef` (or an :class:`InputError`)."""

    def __init__(self, manifest: str, settings: Settings, flt: Filter) -> None:
        self.manifest = manifest
        self.source_root = settings.source_root
        self.root = os.path.abspath(settings.source_root or os.path.dirname(manifest))
        self.flt = flt
        try:
            self.keep = kept_params(settings.keep_query_params)
        except ValueError as exc:
            raise ConfigError(f"CARNUMBER_KEEP_QUERY_PARAMS: {exc}") from None

    def ref(self, value: str, is_url: bool, meta: dict[str, str]) -> ImageRef | None:
        """The entry's ref (None: outside the time window). Raises :class:`InputError` for a line
        that names no usable image and :class:`ImageRejected` for a path it may not name."""
        value = value.strip()
        if not value:
            raise InputError("empty url/path")
        if is_url or "://" in value:
            if value.lower().startswith(("http://", "https://")):
                return self._url(value, meta)
            source = self._source(value)
        else:
            source = self._path(value)
        if self.flt.has_time and not self.flt.time_ok(source, None):
            return None
        return ImageRef(source, meta=meta)

    def _url(self, url: str, meta: dict[str, str]) -> ImageRef | None:
        """An http(s) URL: known by its canonical source; the URL as listed sealed when that
        dropped anything. Refused when the service would refuse it or its signature expired."""
        source = canonical_url(url, self.keep)
        if len(source.encode("utf-8", "surrogateescape")) > MAX_URL_BYTES:
            raise ImageRejected("local.urlTooLong", f"the URL is longer than the API's {MAX_URL_BYTES} bytes")
        image_id = image_id_for(url)
        if self.flt.has_time and not self.flt.time_ok(source, None):
            return None
        if len(url.encode("utf-8", "surrogateescape")) > MAX_URL_BYTES:
            why = f"the URL is longer than the API's {MAX_URL_BYTES} bytes"
            return ImageRef(source, image_id, refused=("local.urlTooLong", why))
        expiry = signature_expiry(url)
        if expiry is not None and expiry <= time.time():
            why = "the signed URL had expired when it was enqueued; list it signed anew"
            return ImageRef(source, image_id, refused=("local.urlExpired", why))
        secret = url if source != url else None
        return ImageRef(source, image_id, meta=meta, secret_url=secret)

    def _source(self, value: str) -> str:
        loc = parse_uri(value)
        if loc.kind == "file":
            return file_uri(self._contained(loc.path, absolute_only=True))
        if loc.kind in ("tar", "zip"):
            return archive_uri(loc.kind, self._contained(loc.path, absolute_only=True), loc.member)
        if loc.kind not in ("s3", "oss"):
            raise InputError(f"{loc.kind}:// is not a source a manifest may list")
        return object_uri(loc.kind, loc.bucket, loc.key)

    def _path(self, value: str) -> str:
        return file_uri(self._contained(value, absolute_only=False))

    def _contained(self, value: str, absolute_only: bool) -> str:
        if os.path.isabs(value):
            path = os.path.normpath(value)
            if self.source_root is not None and not inside(self.root, path):
                raise ImageRejected("local.outsideRoot", f"{value!r} is outside CARNUMBER_SOURCE_ROOT")
            return path
        if absolute_only:
            raise InputError(f"{value!r}: URIs need absolute paths")
        path = os.path.normpath(os.path.join(self.root, value))
        if not inside(self.root, path):
            raise ImageRejected("local.outsideRoot", f"{value!r} escapes {self.root!r} ('..' or a symlink)")
        return path


def _meta(row: dict[str, Any], skip: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in row.items():
        if k in skip or v is None or v == "":
            continue
        text = _text(v)
        if len(text.encode("utf-8", "surrogateescape")) > MAX_FIELD_BYTES:
            size = len(text.encode("utf-8", "surrogateescape"))
            raise InputError(f"field {str(k)[:40]!r} is {size} bytes; at most {MAX_FIELD_BYTES}")
        if _has_surrogates(text) or _has_surrogates(str(k)):
            raise InputError("not UTF-8")
        out[str(k)] = text
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
    """Stream a manifest's entries as refs, one per line that names an image (refused ones
    included); a line naming an image already listed goes to ``on_skip`` (file:line: reason)."""
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
    with DigestSet() as seen:
        for line, ref in _refs(path, entries, rows):
            if ref is None:
                continue
            if not seen.add(ref.image_id.encode()):
                on_skip(InputError(f"{name}:{line}: the same image as an earlier line ({ref.image_id})"))
                continue
            if ref.refused is not None:
                log.warning("refused %s:%d: %s: %s", name, line, *ref.refused)
            yield ref


def _refs(
    path: str, entries: _Entries, rows: Iterator[tuple[int, dict[str, Any] | InputError]]
) -> Iterator[tuple[int, ImageRef | None]]:
    """(line, ref) for each row; a row that names no usable image becomes a refused ref."""
    name = os.path.basename(path)
    line = 0
    while True:
        try:
            line, row = next(rows)
        except StopIteration:
            return
        except (OSError, ValueError) as exc:  # the file itself broke mid-way (I/O, a bad row group)
            why = f"{name}: unreadable after line {line} ({type(exc).__name__}); the rest is not listed"
            yield line + 1, ImageRef(manifest_line_uri(path, line + 1), refused=("local.manifest", why))
            return
        try:
            if isinstance(row, InputError):
                raise row
            if "_line" in row:  # plain list: one value, URI or path
                ref = entries.ref(row["_line"], False, {})
            else:
                value, is_url = _pick(row)
                ref = entries.ref(value, is_url, _meta(row, _URL_KEYS + _PATH_KEYS))
        except ImageRejected as exc:  # a path it may not name, a URL too long: the line is the item
            ref = ImageRef(manifest_line_uri(path, line), refused=(exc.code, f"{name}:{line}: {exc.message}"))
        except (InputError, ValueError) as exc:  # ValueError: not Unicode, a NUL byte in a path
            why = f"{name}:{line}: {_reason(exc)}"
            ref = ImageRef(manifest_line_uri(path, line), refused=("local.manifest", why))
        yield line, ref


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnicodeError):
        return "not valid Unicode"
    return str(exc) if isinstance(exc, InputError) else f"not a usable path or URL ({exc})"


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
