"""Plate background colour from a straightened plate image.

The background is the plate's dominant colour: among strongly coloured pixels the hue decides
blue / yellow / green; a plate with few coloured pixels is white or black by its brightness.
Characters cover roughly a third of a plate, so a majority vote over the central area is
enough. Hues are OpenCV's (0..180).
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["COLOURS", "plate_colour"]

COLOURS = ("blue", "yellow", "green", "white", "black")

# hue bands (OpenCV scale), for pixels with enough saturation and brightness
_BANDS = {"yellow": (11, 34), "green": (35, 90), "blue": (91, 135)}
_MIN_SAT = 70
_MIN_VAL = 50


def plate_colour(plate: np.ndarray) -> tuple[str, float]:
    """Background colour of a BGR plate crop and the share (0..1) of pixels that voted for it."""
    h, w = plate.shape[:2]
    core = plate[round(h * 0.1) : max(round(h * 0.9), 1), round(w * 0.05) : max(round(w * 0.95), 1)]
    if core.size == 0:
        core = plate
    hsv = cv2.cvtColor(core, cv2.COLOR_BGR2HSV).reshape(-1, 3).astype(np.int32)
    hue, sat, val = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    total = max(len(hue), 1)
    coloured = (sat >= _MIN_SAT) & (val >= _MIN_VAL)
    votes = {
        name: int(np.count_nonzero(coloured & (hue >= lo) & (hue <= hi)))
        for name, (lo, hi) in _BANDS.items()
    }
    best = max(votes, key=lambda k: votes[k])
    share = votes[best] / total
    # NEV plates fade from green to near-white, so green needs a smaller share
    need = 0.18 if best == "green" else 0.25
    if share >= need:
        return best, min(1.0, 0.5 + share)
    bright = float(np.count_nonzero(val >= 130)) / total
    if bright >= 0.5:
        return "white", 0.5 + bright / 2
    return "black", 0.5 + (1 - bright) / 2
