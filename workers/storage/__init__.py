"""Storage readers (worker side): canonical source URIs in, ``Image(url=|body=)`` out.

Modules: :mod:`~workers.storage.uris` (the URI forms, pure), :mod:`~workers.storage.archives`
(tar/zip members), :mod:`~workers.storage.objects` (the object-store seam),
:mod:`~workers.storage.s3` (boto3) and :mod:`~workers.storage.oss` (oss2), imported only when an
``s3://``/``oss://`` URI is used, :mod:`~workers.storage.signed` (an object passed by URL, signed
at each attempt, bound to the checked version), :mod:`~workers.storage.sealed` (signed ``http(s)``
URLs kept out of messages) and :mod:`~workers.storage.resolver` (the :class:`Resolver`).
"""

from __future__ import annotations

from workers.storage.resolver import Resolved, Resolver
from workers.storage.uris import Location, parse_uri

__all__ = ["Location", "Resolved", "Resolver", "parse_uri"]
