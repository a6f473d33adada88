"""Turn a chunk's canonical sources into what the API call sends: ``Image(url=)`` or ``Image(body=)``.

==========================  ==================================================================
source                      becomes
==========================  ==================================================================
``file:///abs``             bytes, checked with :func:`~workers.imagecheck.check_image`
``tar:///abs/x.tar#m``      member bytes (one open per archive per chunk; see ``archives``)
``zip:///abs/x.zip#m``      member bytes
``s3://b/k``                ``s3_mode=url``: HEAD (exists? ≤ 10 MiB?) then a presigned GET URL
                            valid ``signed_url_ttl_s``; ``bytes``: the object's bytes, checked
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

from workers.api.client import Image
from workers.config import Settings
from workers.errors import CarnumberError, ConfigError, ImageRejected, InputError, TransportError
from workers.imagecheck import MAX_BYTES, check_image, check_url, maybe_reencode
from workers.message import ImageRef
from workers.storage.archives import ArchiveReader
from workers.storage.objects import ObjectStore, store_for
from workers.storage.uris import Location, parse_uri

__all__ = ["Resolved", "Resolver"]

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
        threshold = self.settings.reencode_above_bytes
        if threshold is not None and len(data) > threshold:
            data = maybe_reencode(data, info, threshold)
        return Image(body=data)

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
                size = store.head(loc.bucket, loc.key)
                if size > MAX_BYTES:
                    raise ImageRejected(
                        "local.imageTooLarge",
                        f"object is {size} bytes; the API allows at most {MAX_BYTES}",
                    )
                if size == 0:
                    raise ImageRejected("local.emptyImage", "object is 0 bytes")
                url = store.presign(loc.bucket, loc.key, self.settings.signed_url_ttl_s)
                try:
                    check_url(url)
                    return Image(url=url)
                except ImageRejected:
                    pass  # too long to pass by URL: send the bytes instead
            return self._bytes_image(store.get(loc.bucket, loc.key, MAX_BYTES))
        except ConfigError:
            raise
        except (ImageRejected, InputError, TransportError) as exc:
            return exc
