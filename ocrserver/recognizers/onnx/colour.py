"""Plate background colour from a straightened plate image.

The background is the plate's dominant colour: among strongly coloured pixels the hue decides
blue / yellow / green; a plate with few coloured pixels is white or black by its brightness.
Characters cover roughly a third of a plate, so a majority vote over the central area is
enough. Hues are OpenCV's (0..180).

Lighting casts shift hues (a blue plate under sodium light looks yellow), so the text's
polarity is checked too: blue and black plates carry light characters on a dark ground,
yellow, green and white plates dark characters on a light ground. Green is exempt (a new-energy
plate fades to white at the top, which upsets a two-level split).
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["COLOURS", "plate_colour"]

COLOURS = ("blue", "yellow", "green", "white", "black")

# hue bands (OpenCV scale), for pixels with enough saturation and brightness
_BANDS = {"yellow": (11, 34), "green": (35, 79), "blue": (80, 135)}  # cyan counts as blue
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
    light_ground = _light_share(core)
    # NEV plates fade from green to near-white, so green needs a smaller share
    need = 0.18 if best == "green" else 0.25
    if share >= need:
        if best == "yellow" and share < 0.6 and light_ground < 0.4:
            # patchy yellow and light text on a dark ground: a blue plate under a warm cast
            return "blue", 0.6
        return best, min(1.0, 0.5 + share)
    if light_ground >= 0.55:
        return "white", min(1.0, 0.5 + light_ground / 2)
    if votes["blue"] >= votes["yellow"] and votes["blue"] > 0.02 * total:
        return "blue", 0.5
    return "black", 0.5 + (1 - light_ground) / 2


def _light_share(core: np.ndarray) -> float:
    """Share of pixels on the light side of an Otsu split of the grey image (0..1)."""
    grey = cv2.cvtColor(core, cv2.COLOR_BGR2GRAY)
    threshold, _ = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(np.count_nonzero(grey > threshold)) / max(grey.size, 1)
