"""Recognizer registry: ``get_recognizer(name, **options)``.

* ``replay`` (:class:`~ocrserver.recognizers.replay.ReplayRecognizer`): answers from known truth
  (embedded in the image, or a ``--truth`` JSONL sidecar); option ``truth_path``.
* ``onnx`` (``ocrserver.recognizers.onnx.OnnxRecognizer``): the offline model, imported only when
  asked for; option ``model_dir``. Needs the ``onnx`` extra.

Two optional class attributes steer how the server calls a recognizer: ``inline = True`` runs it
on the event loop (cheap ones only, like replay); ``batching = True`` routes calls through the
micro-batcher to :meth:`Recognizer.recognize_batch`. Otherwise calls run in a worker thread.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ocrserver.recognizers.base import PLATE_TYPES, DetectedPlate, ImageInput, Recognizer
from workers.errors import ConfigError

__all__ = [
    "PLATE_TYPES",
    "RECOGNIZERS",
    "DetectedPlate",
    "ImageInput",
    "Recognizer",
    "get_recognizer",
]

# name -> (module, class): imported on demand so optional weight stays optional
RECOGNIZERS: dict[str, tuple[str, str]] = {
    "replay": ("ocrserver.recognizers.replay", "ReplayRecognizer"),
    "onnx": ("ocrserver.recognizers.onnx", "OnnxRecognizer"),
}

_HINTS = {"onnx": "install the onnx extra: pip install 'carnumber[onnx]'"}


def get_recognizer(name: str, **options: Any) -> Recognizer:
    """A new recognizer by registry name; ``None``-valued options are dropped.

    Raises :class:`ConfigError` for an unknown name (listing the known ones) or when the
    recognizer's optional dependencies are missing.
    """
    if name not in RECOGNIZERS:
        raise ConfigError(
            f"unknown recognizer {name!r}; choose one of: {', '.join(sorted(RECOGNIZERS))}"
        )
    module_name, class_name = RECOGNIZERS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = _HINTS.get(name, "")
        raise ConfigError(f"recognizer {name!r} cannot be loaded ({exc}); {hint}".rstrip("; ")) from None
    factory: Callable[..., Recognizer] = getattr(module, class_name)
    return factory(**{k: v for k, v in options.items() if v is not None})
