"""Plate detection: a RetinaFace-style detector that returns a box and four corners per plate.

The model (``clp_det.onnx``) takes a BGR image minus the per-channel mean (104, 117, 123),
NCHW float32, at any size; it outputs, for every prior (anchor), box offsets, a plate score
and four landmark offsets. Priors are the classic RetinaFace grid: strides 8/16/32 with two
square anchor sizes each. Decoding, non-maximum suppression and the multi-scale merge are
plain numpy here. All coordinates returned are pixels of the image passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

__all__ = ["Detection", "PlateDetector", "decode_priors", "nms", "prior_boxes"]

_MEAN_BGR_TUPLE = (104.0, 117.0, 123.0)
_STEPS = (8, 16, 32)
_MIN_SIZES = ((24, 48), (96, 192), (384, 768))
_VARIANCE = (0.1, 0.2)


@dataclass(frozen=True, slots=True)
class Detection:
    """One detected plate: axis-aligned box, score 0..1, four corners (x, y) in image pixels.

    ``corners`` are in the model's order, which is bottom-right, bottom-left, top-left,
    top-right for an upright plate; :func:`rectify.order_corners` puts them in reading order.
    """

    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    score: float
    corners: np.ndarray  # shape (4, 2), float32


@lru_cache(maxsize=32)
def prior_boxes(height: int, width: int) -> np.ndarray:
    """Priors (cx, cy, w, h), normalised to the image size, for an input of ``height``×``width``."""
    parts = []
    for step, sizes in zip(_STEPS, _MIN_SIZES, strict=True):
        fh, fw = -(-height // step), -(-width // step)
        ys, xs = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
        cx = (xs.reshape(-1) + 0.5) * step / width
        cy = (ys.reshape(-1) + 0.5) * step / height
        per_size = [
            np.stack([cx, cy, np.full_like(cx, s / width), np.full_like(cy, s / height)], axis=1)
            for s in sizes
        ]
        # anchors are laid out cell by cell, both sizes of a cell together
        parts.append(np.stack(per_size, axis=1).reshape(-1, 4))
    out = np.concatenate(parts, axis=0).astype(np.float32)
    out.setflags(write=False)
    return out


def decode_priors(
    loc: np.ndarray, landms: np.ndarray, priors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Undo the SSD offset encoding: boxes (N, 4) as x1y1x2y2 and corners (N, 8), normalised."""
    v0, v1 = _VARIANCE
    centres = priors[:, :2] + loc[:, :2] * v0 * priors[:, 2:]
    sizes = priors[:, 2:] * np.exp(loc[:, 2:] * v1)
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
    pts = landms.reshape(-1, 4, 2) * v0 * priors[:, None, 2:] + priors[:, None, :2]
    return boxes, pts.reshape(-1, 8)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression; returns the kept indices, best first."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.maximum(0.0, x2 - x1) * np.maximum(0.0, y2 - y1)
    order = scores.argsort()[::-1]
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = iw * ih
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-6)
        order = rest[iou <= iou_threshold]
    return keep


class PlateDetector:
    """Runs ``clp_det.onnx`` at one or more scales and merges the results.

    ``max_sides`` are the long-side sizes (px) the image is resized to (never enlarged beyond
    ``upscale_limit`` times); small plates are found at the larger scale, large ones at the
    smaller. ``score_threshold`` is the plate score a detection needs (0..1).
    """

    def __init__(
        self,
        session: Any,
        *,
        max_sides: tuple[int, ...] = (640,),
        score_threshold: float = 0.6,
        nms_iou: float = 0.3,
        upscale_limit: float = 2.0,
    ) -> None:
        self._session = session
        self._input = session.get_inputs()[0].name
        self.max_sides = max_sides
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou
        self.upscale_limit = upscale_limit

    def _run_scale(self, image: np.ndarray, scale: float) -> tuple[np.ndarray, ...]:
        h, w = image.shape[:2]
        sh, sw = max(16, round(h * scale)), max(16, round(w * scale))
        resized = image if (sh, sw) == (h, w) else cv2.resize(
            image, (sw, sh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        )
        # (pixels - mean) as one NCHW float32 blob, in OpenCV's native code
        blob = cv2.dnn.blobFromImage(resized, 1.0, (sw, sh), _MEAN_BGR_TUPLE, swapRB=False, crop=False)
        loc, conf, landms = self._session.run(None, {self._input: blob})
        scores = conf[0, :, 1]
        keep = scores > self.score_threshold
        if not keep.any():
            empty = np.zeros((0, 4), np.float32)
            return empty, np.zeros((0,), np.float32), np.zeros((0, 8), np.float32)
        boxes, pts = decode_priors(loc[0][keep], landms[0][keep], prior_boxes(sh, sw)[keep])
        # normalised -> original-image pixels
        boxes = boxes * np.array([w, h, w, h], np.float32)
        pts = pts * np.array([w, h] * 4, np.float32)
        return boxes, scores[keep], pts

    def __call__(self, image: np.ndarray) -> list[Detection]:
        """Detect plates in a BGR image (H, W, 3 uint8); best score first."""
        h, w = image.shape[:2]
        all_boxes, all_scores, all_pts = [], [], []
        for side in self.max_sides:
            scale = min(side / max(h, w), self.upscale_limit)
            boxes, scores, pts = self._run_scale(image, scale)
            all_boxes.append(boxes)
            all_scores.append(scores)
            all_pts.append(pts)
        boxes = np.concatenate(all_boxes)
        scores = np.concatenate(all_scores)
        pts = np.concatenate(all_pts)
        if not len(scores):
            return []
        return [
            Detection(
                box=tuple(float(v) for v in boxes[i]),  # type: ignore[arg-type]
                score=float(scores[i]),
                corners=pts[i].reshape(4, 2).astype(np.float32),
            )
            for i in nms(boxes, scores, self.nms_iou)
        ]
