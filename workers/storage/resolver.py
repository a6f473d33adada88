"""Turn a chunk's canonical sources into what the API call sends: ``Image(url=)`` or ``Image(body=)``.

==========================  ==================================================================
source                      becomes
==========================  ==================================================================
``file:///abs``             bytes, checked with :func:`~workers.imagecheck.check_image`
``tar:///abs/x.tar#m``      member bytes (one open per archive per chunk; see ``archives``)
``zip:///abs/x.zip#m``      member bytes
``s3://b/k``                ``s3_mode=url``: the local checks from ranged reads of the head and
                            the tail (:func:`precheck_object`), then a presigned GET URL valid
                            ``signed_url_ttl_s``; ``bytes``: the object's bytes, checked
``oss://b/k``               the same with ``oss_mode``
``http(s)://...``           ``Image(url=)`` after :func:`~workers.imagecheck.check_url`
==========================  ==================================================================

A presigned URL longer than the API's 2048 bytes (long STS tokens do that) falls back to bytes
for that image. Signed URLs live only inside the returned :class:`Image`: never logged, never in
an error message, never stored. Bytes are re-encoded when ``reencode_above_bytes`` is set.

Per image, the outcome is an ``Image`` or the error to record: :class:`ImageRejected` (terminal,
local code), :class:`InputError` (terminal: missing file/member/object, bad URI) or
:class:`TransportError` (retryable: storage unreachable). A :class:`ConfigError` (no boto3, no
OSS endpoint or credentials) concerns every image of that scheme and is raised.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from workers import content
from workers.api.client import Image
from workers.config import Settings
from workers.errors import CarnumberError, ConfigError, ImageRejected, InputError, TransportError
from workers.imagecheck import (
    HEAD_BYTES,
    MAX_BYTES,
    TAIL_BYTES,
    check_image,
    check_parts,
    check_url,
    maybe_reencode,
)
from workers.message import ImageRef
from workers.storage.archives import ArchiveReader
from workers.storage.objects import ObjectStore, RangeRead, store_for
from workers.storage.uris import Location, parse_uri

__all__ = ["LONG_HEAD_BYTES", "Resolved", "Resolver", "precheck_object"]

# The second head read when the first did not hold the whole header (a large EXIF block with a
# thumbnail, ICC profiles): still far less than a camera picture.
LONG_HEAD_BYTES = 128 * 1024

Resolved = Image | ImageRejected | InputError | TransportError


class Resolver:
    """Resolves chunks of :class:`~workers.message.ImageRef` for one worker process.

    ``stores`` maps ``s3``/``oss`` to an :class:`ObjectStore` (default: built from settings on
    first use). Thread-safe; call :meth:`close` when done.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        stores: dict[str, ObjectStore] | None = None,
        archives: ArchiveReader | None = None,
        max_threads: int = 8,
    ) -> None:
        self.settings = settings
        self.stores: dict[str, ObjectStore] = dict(stores or {})
        self.archives = archives or ArchiveReader()
        self.max_threads = max_threads
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # chunks may be resolved from several threads at once
        root = settings.source_root
        self.root = os.path.realpath(root) if root else None

    # -- public -----------------------------------------------------------------------------

    def resolve_many(self, refs: Sequence[ImageRef]) -> list[Image | CarnumberError]:
        """One outcome per ref, in order (see the module docstring for which errors).
        Raises :class:`ConfigError` only."""
        out: list[Image | CarnumberError | None] = [None] * len(refs)
        archive_groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
        object_jobs: list[tuple[int, Location]] = []
        for i, ref in enumerate(refs):
            try:
                loc = parse_uri(ref.source)
                if loc.kind == "http":
                    check_url(loc.url)
                    out[i] = Image(url=loc.url)
                elif loc.kind == "file":
                    out[i] = self._bytes_image(self._read_file(loc.path))
                elif loc.kind in ("tar", "zip"):
                    self._check_root(loc.path)
                    archive_groups.setdefault((loc.kind, loc.path), []).append((i, loc.member))
                else:
                    object_jobs.append((i, loc))
            except (ImageRejected, InputError, TransportError) as exc:
                out[i] = exc
        for (kind, path), members in archive_groups.items():
            data = self.archives.read(kind, path, [m for _, m in members])
            for i, member in members:
                got = data[member]
                out[i] = got if isinstance(got, CarnumberError) else self._safe_bytes_image(got)
        if object_jobs:
            for i, result in self._run_objects(object_jobs):
                out[i] = result
        assert all(o is not None for o in out)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.archives.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # -- local files ------------------------------------------------------------------------

    def _check_root(self, path: str) -> None:
        """With ``source_root`` set, a worker reads nothing outside it (symlinks resolved)."""
        if self.root is None:
            return
        real = os.path.realpath(path)
        if real != self.root and not real.startswith(self.root.rstrip("/") + "/"):
            raise InputError(f"{path!r} is outside CARNUMBER_SOURCE_ROOT")

    def _read_file(self, path: str) -> bytes:
        self._check_root(path)
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size > MAX_BYTES:
                    raise ImageRejected(
                        "local.imageTooLarge",
                        f"file is {size} bytes; the API allows at most {MAX_BYTES}",
                    )
                return fh.read()
        except FileNotFoundError:
            raise InputError(f"file {path!r} not found") from None
        except (IsADirectoryError, PermissionError, NotADirectoryError) as exc:
            raise InputError(f"file {path!r} unreadable ({type(exc).__name__})") from None
        except OSError as exc:
            raise TransportError("local.read", f"file {path!r}: {type(exc).__name__}") from None

    def _bytes_image(self, data: bytes) -> Image:
        info = check_image(data)
        key = content.of_bytes(data)  # the picture as stored, before any re-encoding
        threshold = self.settings.reencode_above_bytes
        if threshold is not None and len(data) > threshold:
            data = maybe_reencode(data, info, threshold)
        return Image(body=data, content_key=key)

    def _safe_bytes_image(self, data: bytes) -> Image | CarnumberError:
        try:
            return self._bytes_image(data)
        except ImageRejected as exc:
            return exc

    # -- object stores ----------------------------------------------------------------------

    def _store(self, scheme: str) -> ObjectStore:
        store = self.stores.get(scheme)
        if store is None:
            with self._lock:
                store = self.stores.get(scheme)
                if store is None:
                    store = self.stores[scheme] = store_for(scheme, self.settings)
        return store

    def _run_objects(self, jobs: list[tuple[int, Location]]) -> list[tuple[int, Image | CarnumberError]]:
        for scheme in {loc.kind for _, loc in jobs}:
            self._store(scheme)  # ConfigError (missing library, endpoint...) surfaces here, once
        if len(jobs) == 1:
            i, loc = jobs[0]
            return [(i, self._object_image(loc))]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_threads, thread_name_prefix="resolve")
            pool = self._pool
        one: Callable[[Location], Image | CarnumberError] = self._object_image
        return list(zip((i for i, _ in jobs), pool.map(one, [loc for _, loc in jobs]), strict=True))

    def _object_image(self, loc: Location) -> Image | CarnumberError:
        store = self._store(loc.kind)
        mode = self.settings.s3_mode if loc.kind == "s3" else self.settings.oss_mode
        try:
            if mode == "url":
                reads: list[RangeRead] = []
                data = precheck_object(store, loc.bucket, loc.key, on_read=reads.append)
                url = store.presign(loc.bucket, loc.key, self.settings.signed_url_ttl_s)
                try:
                    check_url(url)
                    # By the store's ETag even when the check read the whole object: the
                    # same key `carnumber plan` and the answer cache know it by.
                    key = content.of_object(reads[0].etag, reads[0].size) if reads else None
                    if key is None and data is not None:
                        key = content.of_bytes(data)
                    return Image(url=url, content_key=key)
                except ImageRejected:
                    pass  # too long to pass by URL: send the bytes instead
                if data is not None:
                    return self._bytes_image(data)
            return self._bytes_image(store.get(loc.bucket, loc.key, MAX_BYTES))
        except ConfigError:
            raise
        except (ImageRejected, InputError, TransportError) as exc:
            return exc


def precheck_object(
    store: ObjectStore,
    bucket: str,
    key: str,
    *,
    head_bytes: int = HEAD_BYTES,
    tail_bytes: int = TAIL_BYTES,
    on_read: Callable[[RangeRead], None] | None = None,
) -> bytes | None:
    """The local image checks for an object that is passed to the API by URL, reading only what
    they need: a ranged read of the first ``head_bytes`` (which also gives the size and content
    type), of the last ``tail_bytes`` when the object is longer, then a longer head
    (:data:`LONG_HEAD_BYTES`) and finally the whole object only when the parts cannot decide
    (see :func:`~workers.imagecheck.check_parts`). A 0-byte or > 10 MiB object is refused from
    its size alone. Returns the whole object's bytes when they were read anyway, else None.

    Raises :class:`ImageRejected` (the rule it broke; the message names the store's
    Content-Type for a format refusal), :class:`InputError` (missing object or bucket, access
    denied), :class:`TransportError` (store unreachable). ``on_read`` sees every ranged read
    (byte accounting in benchmarks).
    """
    first = store.get_range(bucket, key, 0, head_bytes)
    if on_read is not None:
        on_read(first)
    size, head = first.size, first.data
    try:
        if size == 0 or size > MAX_BYTES:
            check_parts(b"", b"", size)  # raises: empty / too large
        if len(head) >= size:
            check_image(head[:size])
            return head[:size]
        last = store.get_range(bucket, key, max(len(head), size - tail_bytes), tail_bytes)
        if on_read is not None:
            on_read(last)
        if check_parts(head, last.data, size) is not None:
            return None
        if size > LONG_HEAD_BYTES > len(head):
            longer = store.get_range(bucket, key, 0, LONG_HEAD_BYTES)
            if on_read is not None:
                on_read(longer)
            if check_parts(longer.data, last.data, size) is not None:
                return None
        data = store.get(bucket, key, MAX_BYTES)
        if on_read is not None:
            on_read(RangeRead(data, 0, len(data), first.content_type, first.etag))
        check_image(data)
        return data
    except ImageRejected as exc:
        if exc.code == "local.unsupportedFormat" and first.content_type:
            raise ImageRejected(
                exc.code, f"{exc.message} (the store says Content-Type {first.content_type})"
            ) from None
        raise
