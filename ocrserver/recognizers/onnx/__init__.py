"""Offline Chinese plate recognizer on two ONNX models (detector + CTC text reader).

``OnnxRecognizer(model_dir=None)`` is what ``carnumber serve --recognizer onnx`` loads. The
heavy imports (onnxruntime, numpy, OpenCV: the ``onnx`` extra) happen on first attribute
access, so importing this package for its grammar or colour helpers stays cheap to name.

Modules: ``model_files`` (the files in ``models/``, sessions), ``detection`` (boxes + corners), ``rectify``
(geometry), ``recognition`` (CTC reader), ``grammar`` (national formats), ``colour``,
``plate_type`` (product classes), ``pipeline`` (the recognizer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pipeline import OnnxRecognizer, PipelineOptions

__all__ = ["OnnxRecognizer", "PipelineOptions"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        try:
            from . import pipeline
        except ImportError as exc:
            from workers.errors import ConfigError

            raise ConfigError(
                f"the onnx recognizer needs {exc.name or 'numpy/opencv'}: pip install 'carnumber[onnx]'"
            ) from exc
        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
