"""Text recognition: a CRNN with CTC output over the plate alphabet (``clp_v2_c_rec.onnx``).

Input: BGR crops resized to 32 px high (width following the crop's proportions, at most
``max_width``), scaled to [-1, 1], right-padded with zeros to ``max_width`` and stacked into one
batch (N, 3, 32, max_width). Output: per time step (T ≈ max_width / 4) a softmax over
``1 + len(charset)`` classes, class 0 being the CTC blank. Decoding is greedy: best class per
step, repeats merged, blanks dropped (:func:`ctc_greedy_decode`), or a prefix beam search that
keeps the few most probable strings (:func:`ctc_beam_search`) so a plate grammar can choose
among them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

__all__ = ["Reading", "TextRecognizer", "ctc_beam_search", "ctc_greedy_decode"]


@dataclass(frozen=True, slots=True)
class Reading:
    """A decoded string with each character's probability and the time steps it spans."""

    text: str
    char_probs: tuple[float, ...]
    spans: tuple[tuple[int, int], ...]  # [start, end) time steps of each character

    @property
    def prob(self) -> float:
        """Confidence of the whole string: the mean character probability (0 when empty)."""
        return float(np.mean(self.char_probs)) if self.char_probs else 0.0


def ctc_greedy_decode(probs: np.ndarray, charset: list[str]) -> Reading:
    """Greedy CTC decode of one (T, 1 + len(charset)) probability matrix.

    A character's probability is its best step's probability; consecutive identical classes
    form one character unless a blank separates them.
    """
    best = probs.argmax(axis=1)
    chars: list[str] = []
    char_probs: list[float] = []
    spans: list[tuple[int, int]] = []
    prev = 0
    for t, cls in enumerate(best.tolist()):
        if cls != 0 and cls == prev:
            start, _ = spans[-1]
            spans[-1] = (start, t + 1)
            char_probs[-1] = max(char_probs[-1], float(probs[t, cls]))
        elif cls != 0:
            chars.append(charset[cls - 1])
            char_probs.append(float(probs[t, cls]))
            spans.append((t, t + 1))
        prev = cls
    return Reading("".join(chars), tuple(char_probs), tuple(spans))


def ctc_beam_search(
    probs: np.ndarray, charset: list[str], *, beam: int = 8, prune: float = 1e-3
) -> list[tuple[str, float]]:
    """The ``beam`` most probable strings of one (T, classes) CTC output, best first.

    Each string's probability sums over all its alignments (prefix beam search), so it is the
    model's posterior of that exact text (0..1). Classes under ``prune`` at a step are skipped.
    """
    # prefix (tuple of class ids) -> [p ending in blank, p ending in its last class]
    beams: dict[tuple[int, ...], list[float]] = {(): [1.0, 0.0]}
    for row in probs.astype(np.float64):
        blank = float(row[0])
        classes = [int(c) for c in np.flatnonzero(row > prune) if c != 0]
        nxt: dict[tuple[int, ...], list[float]] = {}
        for prefix, (p_b, p_nb) in beams.items():
            entry = nxt.setdefault(prefix, [0.0, 0.0])
            entry[0] += (p_b + p_nb) * blank
            last = prefix[-1] if prefix else -1
            for c in classes:
                pc = float(row[c])
                if c == last:
                    entry[1] += p_nb * pc  # the same character continues
                    grown = nxt.setdefault((*prefix, c), [0.0, 0.0])
                    grown[1] += p_b * pc  # a repeat needs a blank in between
                else:
                    grown = nxt.setdefault((*prefix, c), [0.0, 0.0])
                    grown[1] += (p_b + p_nb) * pc
        best = sorted(nxt.items(), key=lambda kv: kv[1][0] + kv[1][1], reverse=True)[:beam]
        beams = dict(best)
    ranked = sorted(beams.items(), key=lambda kv: kv[1][0] + kv[1][1], reverse=True)
    return [("".join(charset[c - 1] for c in prefix), p_b + p_nb) for prefix, (p_b, p_nb) in ranked]


class TextRecognizer:
    """Batched runs of the CTC text model over straightened plate rows."""

    height = 32

    def __init__(self, session: Any, charset: list[str], *, max_width: int = 320) -> None:
        self._session = session
        self._input = session.get_inputs()[0].name
        self.charset = charset
        self.max_width = max_width

    def preprocess(self, crop: np.ndarray, width: int | None = None) -> np.ndarray:
        """One BGR crop as a (3, 32, width) float32 array (default width: ``max_width``)."""
        width = width or self.max_width
        h, w = crop.shape[:2]
        new_w = min(width, max(8, math.ceil(self.height * w / max(h, 1))))
        resized = cv2.resize(crop, (new_w, self.height), interpolation=cv2.INTER_LINEAR)
        out = np.zeros((3, self.height, width), np.float32)
        out[:, :, :new_w] = (resized.astype(np.float32).transpose(2, 0, 1) / 127.5) - 1.0
        return out

    def probabilities(self, crops: list[np.ndarray], width: int | None = None) -> np.ndarray:
        """Softmax outputs (N, T = width / 4, classes) for ``crops`` in one model run.

        ``width`` (px, default ``max_width``) is the padded input width: the model was trained
        at 320; narrower runs cost proportionally less.
        """
        if not crops:
            return np.zeros((0, 0, len(self.charset) + 1), np.float32)
        batch = np.stack([self.preprocess(c, width) for c in crops])
        return self._session.run(None, {self._input: batch})[0]

    def __call__(self, crops: list[np.ndarray]) -> list[Reading]:
        """Greedy readings of ``crops``, in order."""
        return [ctc_greedy_decode(p, self.charset) for p in self.probabilities(crops)]
