"""Import an optional dependency only when a URI needs it, with an install hint when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from workers.errors import ConfigError

__all__ = ["require"]

_EXTRA = {"boto3": "s3", "botocore": "s3", "oss2": "oss"}


def require(module: str) -> ModuleType:
    """``importlib.import_module(module)``, or a :class:`ConfigError` saying which extra to
    install (``pip install 'carnumber[s3]'`` for boto3, ``[oss]`` for oss2)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = _EXTRA.get(module.split(".", 1)[0], "all")
        raise ConfigError(
            f"{module} is not installed; it is needed for this source: pip install 'carnumber[{extra}]'"
        ) from None
