"""Geometry of a detected plate: corner order, margins, perspective warp, two-row split.

Everything here is plain numpy/OpenCV over pixel coordinates of the original image. A quad is
a float32 array of shape (4, 2) in reading order: top-left, top-right, bottom-right,
bottom-left.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = [
    "clip_polygon",
    "expand_quad",
    "extend_up",
    "order_corners",
    "quad_size",
    "split_rows",
    "warp_quad",
]


def _is_convex(quad: np.ndarray) -> bool:
    signs = []
    for i in range(4):
        a, b, c = quad[i], quad[(i + 1) % 4], quad[(i + 2) % 4]
        u, v = b - a, c - b
        signs.append(float(u[0] * v[1] - u[1] * v[0]) > 0)
    return all(signs) or not any(signs)


def order_corners(model_corners: np.ndarray) -> np.ndarray:
    """Reading-order quad (TL, TR, BR, BL) from the detector's corners (BR, BL, TL, TR).

    The detector's own order follows the plate, so it survives rotation; when it yields a
    twisted or inside-out quad the corners are re-ordered geometrically instead.
    """
    pts = np.asarray(model_corners, dtype=np.float32).reshape(4, 2)
    quad = pts[[2, 3, 0, 1]]
    top_w = quad[1, 0] - quad[0, 0]
    if _is_convex(quad) and top_w > 0 and quad[3, 1] > quad[0, 1]:
        return quad
    s = pts.sum(axis=1)
    d = pts[:, 1] - pts[:, 0]
    return np.array(
        [pts[s.argmin()], pts[d.argmin()], pts[s.argmax()], pts[d.argmax()]], dtype=np.float32
    )


def quad_size(quad: np.ndarray) -> tuple[float, float]:
    """Mean width and height of a quad in pixels."""
    tl, tr, br, bl = quad
    width = (np.linalg.norm(tr - tl) + np.linalg.norm(br - bl)) / 2
    height = (np.linalg.norm(bl - tl) + np.linalg.norm(br - tr)) / 2
    return float(width), float(height)


def expand_quad(quad: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Grow a quad along its own axes: ``dx`` of its width on each side, ``dy`` of its height."""
    tl, tr, br, bl = quad
    u = ((tr - tl) + (br - bl)) / 2
    v = ((bl - tl) + (br - tr)) / 2
    return np.array(
        [tl - dx * u - dy * v, tr + dx * u - dy * v, br + dx * u + dy * v, bl - dx * u + dy * v],
        dtype=np.float32,
    )


def extend_up(quad: np.ndarray, share: float) -> np.ndarray:
    """The quad with its top edge moved up by ``share`` of its height (along its own axis)."""
    tl, tr, br, bl = quad
    v = ((bl - tl) + (br - tr)) / 2
    return np.array([tl - share * v, tr - share * v, br, bl], dtype=np.float32)


def warp_quad(
    image: np.ndarray, quad: np.ndarray, out_height: int, aspect: float | None = None
) -> np.ndarray:
    """Straighten the region inside ``quad`` to an upright ``out_height``-pixel image.

    The width follows ``aspect`` (width / height) or the quad's own proportions. Pixels outside
    the image repeat the border, so plates touching an edge still warp.
    """
    w, h = quad_size(quad)
    ratio = aspect if aspect is not None else w / max(h, 1.0)
    out_w = max(8, round(out_height * ratio))
    dst = np.array(
        [[0, 0], [out_w - 1, 0], [out_w - 1, out_height - 1], [0, out_height - 1]], np.float32
    )
    m = cv2.getPerspectiveTransform(quad.astype(np.float32), dst)
    return cv2.warpPerspective(
        image, m, (out_w, out_height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def split_rows(
    plate: np.ndarray, upper_end: float = 0.40, lower_start: float = 0.33
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a straightened two-row plate into its upper and lower text rows.

    On a double-row plate (440×220 mm) the upper row (60 mm characters from 15 mm down) holds
    the province and authority letter; the lower row's 110 mm characters start at 90 mm. The
    bands overlap a little so a slightly off quad does not clip either row.
    The upper row's two characters sit in the middle 70%.
    """
    h, w = plate.shape[:2]
    upper = plate[: max(1, round(h * upper_end)), round(w * 0.15) : round(w * 0.85)]
    lower = plate[round(h * lower_start) :, :]
    return upper, lower


def clip_polygon(quad: np.ndarray, width: int, height: int) -> tuple[tuple[int, int], ...]:
    """Integer corners clipped into the image (pixels), in the same order."""
    xs = np.clip(np.rint(quad[:, 0]), 0, max(0, width - 1)).astype(int)
    ys = np.clip(np.rint(quad[:, 1]), 0, max(0, height - 1)).astype(int)
    return tuple((int(x), int(y)) for x, y in zip(xs, ys, strict=True))
