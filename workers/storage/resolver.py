"""Turn a chunk's canonical sources into what the API call sends: ``Image(url=)`` or ``Image(body=)``.

==========================  ==================================================================
source                      becomes
==========================  ==================================================================
``file:///abs``             bytes, checked with :func:`~workers.imagecheck.check_image`
``tar:///abs/x.tar#m``      member bytes (one open per archive per chunk; see ``archives``)
``zip:///abs/x.zip#m``      member bytes
``s3://b/k``                ``s3_mode=url``: the local checks from ranged reads of the head and
                            the tail (:func:`precheck_object`), then a :class:`SignedObject`:
                            the pipeline signs a URL at each attempt, bound to the checked
                            version; ``bytes``: the object's bytes, checked
``oss://b/k``               the same with ``oss_mode``
``http(s)://...``           ``Image(url=)`` after :func:`~workers.imagecheck.check_url`; a sealed
                            ref's URL as listed comes from the sealed-URL store
==========================  ==================================================================

Every ref gets exactly one outcome, whatever its bytes or name: an ``Image`` or ``SignedObject``
to call with, or the error to record: :class:`ImageRejected` (terminal, a ``local.*`` code naming
the rule: the image checks, ``local.archive``, ``local.name``, ``local.decode``,
``local.urlExpired``...; a ref the producer refused carries its own), :class:`InputError`
(terminal: missing file/member/object) or :class:`TransportError` (retryable: storage
unreachable; ``local.internal`` for a bug, which costs that image only). Raised, because they
concern every image alike: :class:`ConfigError` (no boto3, no OSS endpoint or credentials) and
:class:`StorageCredentialsError` (the store refuses our credentials, or denies every object of a
bucket none of whose objects was readable), and :class:`RedisUnavailable` (sealed URLs).
Signed URLs never appear in an error message, a log line or a stored value. Bytes are
re-encoded when ``reencode_above_bytes`` is set; pixels that do not decode are ``local.decode``.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import redis

from workers import content
from workers.api.client import Image
from workers.config import Settings
from workers.errors import (
    AccessDenied,
    CarnumberError,
    ConfigError,
    ImageRejected,
    InputError,
    ObjectChanged,
    RedisUnavailable,
    StorageCredentialsError,
    TransportError,
)
from workers.imagecheck import (
    HEAD_BYTES,
    MAX_BYTES,
    TAIL_BYTES,
    check_image,
    check_parts,
    check_url,
    maybe_reencode,
)
from workers.keys import Keys
from workers.message import ImageRef, image_id_for, signature_expiry
from workers.redis_client import resilient_redis
from workers.storage.archives import ArchiveReader
from workers.storage.objects import ObjectStore, RangeRead, no_version, store_for
from workers.storage.sealed import SealedUrls
from workers.storage.signed import SignedObject, attempt_ttl_s
from workers.storage.uris import Location, parse_uri

__all__ = ["LONG_HEAD_BYTES", "Resolved", "Resolver", "precheck_object"]

log = logging.getLogger(__name__)

# The second head read when the first did not hold the whole header (a large EXIF block with a
# thumbnail, ICC profiles): still far less than a camera picture.
LONG_HEAD_BYTES = 128 * 1024
# How often one check starts again because the object changed between its reads.
CHECK_TRIES = 3
# A bucket with an object read this recently: an AccessDenied there concerns that object.
READABLE_FOR_S = 600.0

Resolved = Image | SignedObject | ImageRejected | InputError | TransportError
Target = Image | SignedObject | CarnumberError


class Resolver:
    """Resolves chunks of :class:`~workers.message.ImageRef` for one worker process.

    ``stores`` maps ``s3``/``oss`` to an :class:`ObjectStore` (default: built from settings on
    first use); ``sealed``: the sealed-URL store (default: on ``settings``' Redis, on first use).
    Thread-safe; call :meth:`close` when done.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        stores: dict[str, ObjectStore] | None = None,
        archives: ArchiveReader | None = None,
        max_threads: int = 8,
        sealed: SealedUrls | None = None,
    ) -> None:
        self.settings = settings
        self.stores: dict[str, ObjectStore] = dict(stores or {})
        self.archives = archives or ArchiveReader()
        self.max_threads = max_threads
        self.sealed = sealed
        self._own_redis: redis.Redis | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # chunks may be resolved from several threads at once
        self._readable: dict[tuple[str, str], float] = {}  # (scheme, bucket) -> last good read
        root = settings.source_root
        self.root = os.path.realpath(root) if root else None

    # -- public -----------------------------------------------------------------------------

    def resolve_many(self, refs: Sequence[ImageRef]) -> list[Target]:
        """One outcome per ref, in order (see the module docstring for which errors). Raises
        :class:`ConfigError` (and its :class:`StorageCredentialsError`) and
        :class:`RedisUnavailable` only."""
        out: list[Target | None] = [None] * len(refs)
        archive_groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
        object_jobs: list[tuple[int, Location]] = []
        url_jobs: list[tuple[int, ImageRef, str]] = []
        for i, ref in enumerate(refs):
            queue = (archive_groups, object_jobs, url_jobs)
            out[i] = _one_outcome(lambda ref=ref, i=i, queue=queue: self._local(i, ref, *queue))
        if url_jobs:
            for i, result in self._urls(url_jobs):
                out[i] = result
        for (kind, path), members in archive_groups.items():
            data = self.archives.read(kind, path, [m for _, m in members])
            for i, member in members:
                got = data.get(member)
                if got is None:
                    got = InputError(f"member {member!r} was not read")
                if not isinstance(got, CarnumberError):
                    got = _one_outcome(lambda data=got: self._bytes_image(data))
                out[i] = got
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
        if self._own_redis is not None:
            self._own_redis.close()
            self._own_redis = None

    # -- per ref ----------------------------------------------------------------------------

    def _local(
        self,
        i: int,
        ref: ImageRef,
        archive_groups: dict[tuple[str, str], list[tuple[int, str]]],
        object_jobs: list[tuple[int, Location]],
        url_jobs: list[tuple[int, ImageRef, str]],
    ) -> Target | None:
        """The outcome of a ref that needs nothing but itself and the disk; None when it is
        queued for a batch (archive members, objects, URLs)."""
        if ref.refused is not None:
            return ImageRejected(*ref.refused)  # the producer's own verdict: nothing to read
        loc = parse_uri(ref.source)
        if loc.kind == "http":
            url_jobs.append((i, ref, loc.url))
        elif loc.kind == "file":
            return self._bytes_image(self._read_file(loc.path))
        elif loc.kind in ("tar", "zip"):
            if loc.occurrence != 1:
                return ImageRejected("local.archive", f"entry {loc.occurrence} of a repeated name; not read")
            self._check_root(loc.path)
            archive_groups.setdefault((loc.kind, loc.path), []).append((i, loc.member))
        elif loc.kind == "manifest":
            return ImageRejected("local.manifest", f"line {loc.member} of {loc.path!r} names no image")
        else:
            object_jobs.append((i, loc))
        return None

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
            # Non-blocking: a FIFO named .jpg must not hang the worker (fstat refuses it below).
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        except FileNotFoundError:
            raise InputError(f"file {path!r} not found") from None
        except (IsADirectoryError, PermissionError, NotADirectoryError) as exc:
            raise InputError(f"file {path!r} unreadable ({type(exc).__name__})") from None
        except OSError as exc:
            raise TransportError("local.read", f"file {path!r}: {type(exc).__name__}") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise InputError(f"file {path!r} unreadable (IsADirectoryError)")
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"{path!r} is not a regular file (a pipe, device or socket)")
            if st.st_size > MAX_BYTES:
                raise ImageRejected(
                    "local.imageTooLarge", f"file is {st.st_size} bytes; the API allows at most {MAX_BYTES}"
                )
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read(MAX_BYTES + 1)  # never more, even if it grows meanwhile
        except OSError as exc:
            raise TransportError("local.read", f"file {path!r}: {type(exc).__name__}") from None
        finally:
            os.close(fd)
        if len(data) > MAX_BYTES:
            raise ImageRejected("local.imageTooLarge", f"file grew past {MAX_BYTES} bytes while read")
        return data

    def _bytes_image(self, data: bytes) -> Image:
        info = check_image(data)
        key = content.of_bytes(data)  # the picture as stored, before any re-encoding
        threshold = self.settings.reencode_above_bytes
        if threshold is not None and len(data) > threshold:
            try:
                data = maybe_reencode(data, info, threshold)
            except Exception as exc:  # the header passed; the pixels (a corrupt IDAT...) do not decode
                raise ImageRejected(
                    "local.decode", f"{info.format} pixels do not decode ({type(exc).__name__})"
                ) from None
        return Image(body=data, content_key=key)

    # -- http(s) URLs -----------------------------------------------------------------------

    def _urls(self, jobs: list[tuple[int, ImageRef, str]]) -> list[tuple[int, Target]]:
        """URLs to pass on; a sealed ref's URL as listed comes from the sealed-URL store (one
        ``MGET`` for the chunk). A ref whose id is not its source's also lost query parameters
        (it was re-published from a record, which carries no flag)."""
        lookup = [r.image_id for _, r, _ in jobs if r.sealed or r.image_id != image_id_for(r.source)]
        found = self._sealed_store().get_many(lookup) if lookup else {}
        out: list[tuple[int, Target]] = []
        for i, ref, url in jobs:
            sealed_url = found.get(ref.image_id)
            if sealed_url is None and ref.image_id in lookup:
                out.append((i, ImageRejected(
                    "local.sealedUrlMissing",
                    "the URL as listed is no longer in the sealed-URL store (expired, or another Redis): "
                    "enqueue its manifest again",
                )))
                continue
            out.append((i, _one_outcome(lambda u=sealed_url or url: _url_image(u))))
        return out

    def _sealed_store(self) -> SealedUrls:
        with self._lock:
            if self.sealed is None:
                # The worker's own kind of client: it rides out a Redis restart.
                s = self.settings
                self._own_redis = resilient_redis(s.broker_url, s.redis_outage_s, **s.redis_access())
                keys = Keys(self.settings.key_prefix)
                self.sealed = SealedUrls(self._own_redis, keys, self.settings.journal_ttl_s)
            return self.sealed

    # -- object stores ----------------------------------------------------------------------

    def _store(self, scheme: str) -> ObjectStore:
        store = self.stores.get(scheme)
        if store is None:
            with self._lock:
                store = self.stores.get(scheme)
                if store is None:
                    store = self.stores[scheme] = store_for(scheme, self.settings)
        return store

    def _run_objects(self, jobs: list[tuple[int, Location]]) -> list[tuple[int, Target]]:
        for scheme in {loc.kind for _, loc in jobs}:
            self._store(scheme)  # ConfigError (missing library, endpoint...) surfaces here, once
        if len(jobs) == 1:
            i, loc = jobs[0]
            results = [(i, self._object_image(loc))]
        else:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.max_threads, thread_name_prefix="resolve")
                pool = self._pool
            one: Callable[[Location], Target] = self._object_image
            results = list(zip((i for i, _ in jobs), pool.map(one, [loc for _, loc in jobs]), strict=True))
        return self._judge_denials(jobs, results)

    def _judge_denials(
        self, jobs: list[tuple[int, Location]], results: list[tuple[int, Target]]
    ) -> list[tuple[int, Target]]:
        """An AccessDenied in a bucket where other objects were readable (in this chunk, or
        lately) concerns that object: its row. In a bucket where nothing was: our credentials or
        policy: the fleet stops (images pending) until the operator fixes it and resumes."""
        where = {i: (loc.kind, loc.bucket) for i, loc in jobs}
        now = time.monotonic()
        for i, result in results:
            # The store let us in: a picture, a refusal of its bytes, an object that is not there.
            answered = isinstance(result, Image | SignedObject | ImageRejected | InputError)
            if answered and not isinstance(result, AccessDenied):
                self._readable[where[i]] = now
        for i, result in results:
            if isinstance(result, StorageCredentialsError):
                raise result
            lately = now - self._readable.get(where[i], -READABLE_FOR_S) < READABLE_FOR_S
            if isinstance(result, AccessDenied) and not lately:
                raise StorageCredentialsError(
                    f"{result} and no object of {where[i][0]}://{where[i][1]} was readable: "
                    "check the credentials and the bucket's policy, then `carnumber resume`"
                )
        return [
            (i, ImageRejected("local.accessDenied", str(r)) if isinstance(r, AccessDenied) else r)
            for i, r in results
        ]

    def _object_image(self, loc: Location) -> Target:
        store = self._store(loc.kind)
        mode = self.settings.s3_mode if loc.kind == "s3" else self.settings.oss_mode
        try:
            if mode == "url":
                return self._checked_object(store, loc)
            return self._bytes_image(store.get(loc.bucket, loc.key, MAX_BYTES))
        except (StorageCredentialsError, AccessDenied) as exc:
            return exc  # judged with the whole chunk's results (_judge_denials)
        except ConfigError:
            raise
        except (ImageRejected, InputError, TransportError) as exc:
            return exc
        except Exception as exc:  # a bug must cost one image, not the chunk
            log.exception("object %s://%s/%s: resolving crashed", loc.kind, loc.bucket, loc.key)
            return TransportError("local.internal", f"{type(exc).__name__} while reading the object")

    def _checked_object(self, store: ObjectStore, loc: Location) -> Image | SignedObject:
        """The Url-mode checks, then a :class:`SignedObject` for the version they read. Reads
        after the first carry If-Match: an overwrite in between starts the check again."""
        for _ in range(CHECK_TRIES):
            reads: list[RangeRead] = []
            try:
                data = precheck_object(store, loc.bucket, loc.key, on_read=reads.append)
            except ObjectChanged:
                continue
            first = reads[0]
            # By the store's ETag even when the check read the whole object: the same key
            # `carnumber plan` and the answer cache know it by.
            key = content.of_object(first.etag, first.size)
            if key is None and data is not None:
                return self._bytes_image(data)  # no ETag to bind a URL to: send what was checked
            return SignedObject(
                store,
                loc.bucket,
                loc.key,
                first.etag,
                no_version(first.version_id),
                attempt_ttl_s(self.settings),
                key,
                recheck=lambda: self._recheck(loc),
            )
        raise ObjectChanged(f"{loc.kind}://{loc.bucket}/{loc.key} changed during {CHECK_TRIES} checks")

    def _recheck(self, loc: Location) -> Target:
        """The checks again on the object as it is now (after an overwrite during a call)."""
        result = self._object_image(loc)
        if isinstance(result, AccessDenied):
            return ImageRejected("local.accessDenied", str(result))
        if isinstance(result, StorageCredentialsError):
            raise result
        return result


def _url_image(url: str) -> Image:
    expiry = signature_expiry(url)
    if expiry is not None and expiry <= time.time():
        raise ImageRejected("local.urlExpired", "the signed URL expired before its call; list it signed anew")
    check_url(url)
    return Image(url=url)


def _one_outcome(make: Callable[[], Target | None]) -> Target | None:
    """``make()``, with any error of one image turned into that image's outcome: hostile names
    and bytes are data, never a crash of the chunk. Errors that concern every image are raised."""
    try:
        return make()
    except (ConfigError, RedisUnavailable):
        raise
    except (ImageRejected, InputError, TransportError) as exc:
        return exc
    except UnicodeError:
        return ImageRejected("local.name", "the name is not valid Unicode and names no file")
    except Exception as exc:  # a bug must cost one image, not the chunk
        log.exception("resolving an image crashed")
        return TransportError("local.internal", f"{type(exc).__name__} while reading the image")


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
    denied), :class:`TransportError` (store unreachable), :class:`ObjectChanged` (a read after
    the first found another ETag: each carries If-Match). ``on_read`` sees every ranged read
    (byte accounting in benchmarks).
    """
    first = store.get_range(bucket, key, 0, head_bytes)
    if on_read is not None:
        on_read(first)
    size, head = first.size, first.data
    same = first.etag  # every later read must be of the version the first one saw
    try:
        if size == 0 or size > MAX_BYTES:
            check_parts(b"", b"", size)  # raises: empty / too large
        if len(head) >= size:
            check_image(head[:size])
            return head[:size]
        last = store.get_range(bucket, key, max(len(head), size - tail_bytes), tail_bytes, if_match=same)
        if on_read is not None:
            on_read(last)
        if check_parts(head, last.data, size) is not None:
            return None
        if size > LONG_HEAD_BYTES > len(head):
            longer = store.get_range(bucket, key, 0, LONG_HEAD_BYTES, if_match=same)
            if on_read is not None:
                on_read(longer)
            if check_parts(longer.data, last.data, size) is not None:
                return None
        data = store.get(bucket, key, MAX_BYTES, if_match=same)
        if on_read is not None:
            on_read(RangeRead(data, 0, len(data), first.content_type, first.etag, first.version_id))
        check_image(data)
        return data
    except ImageRejected as exc:
        if exc.code == "local.unsupportedFormat" and first.content_type:
            raise ImageRejected(
                exc.code, f"{exc.message} (the store says Content-Type {first.content_type})"
            ) from None
        raise
