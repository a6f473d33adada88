"""The offline recognizer: detect plates, straighten each, read it, check it, classify it.

Per image: decode → detect (skipped when the image already is a tight plate crop) → for every
plate, warp its four corners upright with a small margin → read one row, or two rows for a
double-row plate → repair/penalise strings that fit no national format → type from format
and colour. :meth:`OnnxRecognizer.recognize_batch` spreads images over a thread pool
(onnxruntime releases the GIL, one intra-op thread per call), so a batch uses every core.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np

from workers.errors import ImageRejected

from ..base import DetectedPlate, ImageInput, Recognizer
from .colour import plate_colour
from .decision import choose_text, format_prior, join_rows, read_candidates
from .detection import PlateDetector
from .model_files import ModelFiles
from .plate_type import classify_plate
from .recognition import TextRecognizer, ctc_beam_search
from .rectify import (
    clip_polygon,
    expand_quad,
    extend_up,
    order_corners,
    quad_size,
    split_rows,
    warp_quad,
)

__all__ = ["OnnxRecognizer", "PipelineOptions", "decode_image"]


@dataclass(frozen=True, slots=True)
class PipelineOptions:
    """Tunables of the pipeline (general, not per image).

    ``detect_sides``: long-side sizes (px) the detector runs at, never enlarging more than
    ``upscale_limit`` times; ``min_score``: detector score a plate needs (0..1); ``views``:
    the straightened crops read per plate, each (margin_x, margin_y, stretch) = share of the
    plate's width/height added on each side, and the horizontal stretch (repeated characters
    need room for a CTC blank between them); ``two_row_aspect``: plates narrower than this
    (width/height) are also read as two rows; ``crop_max_height`` and ``crop_aspect``: images
    this small and plate-shaped are read whole, without detection; ``beam``: candidate
    strings kept per reading; ``upper_row_shares``: how far above a yellow plate's box (in box
    heights) to look, in turn, for a missed upper row; ``scene_width`` and
    ``crop_width``: padded reader input width (px) for detected plates and for whole-image crops
    (256 reads scenes as well as 320 at 80% of the cost; tight crops gain from 320);
    ``min_chars``: shorter readings are dropped (every plate format has at least 7);
    ``sure_prob``: a first view read this surely, in a format that fits the colour, is final.
    """

    detect_sides: tuple[int, ...] = (960,)
    upscale_limit: float = 1.5
    min_score: float = 0.3
    views: tuple[tuple[float, float, float], ...] = ((0.0, 0.0, 1.3), (0.05, 0.0, 1.6))
    green_views: tuple[tuple[float, float, float], ...] = ((0.0, 0.0, 1.3), (0.05, 0.0, 2.0))
    two_row_aspect: float = 2.3
    crop_max_height: int = 160
    crop_aspect: tuple[float, float] = (1.5, 6.5)
    crop_views: tuple[float, ...] = (1.0,)
    warp_height: int = 48
    beam: int = 8
    upper_row_shares: tuple[float, ...] = (0.45, 0.8)
    scene_width: int = 256
    crop_width: int = 320
    min_chars: int = 5
    sure_prob: float = 0.9


def decode_image(data: bytes) -> np.ndarray:
    """BGR uint8 pixels of an encoded image, in stored orientation (EXIF ignored, so the
    coordinates match the file's own pixel grid). Raises :class:`ImageRejected` when undecodable.
    """
    buf = np.frombuffer(data, np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:  # formats OpenCV lacks (GIF): fall back to Pillow
        try:
            import io

            from PIL import Image

            with Image.open(io.BytesIO(data)) as pil:
                img = cv2.cvtColor(np.asarray(pil.convert("RGB")), cv2.COLOR_RGB2BGR)
        except Exception as exc:  # Pillow raises many unrelated types for a bad file
            raise ImageRejected("local.undecodable", "image cannot be decoded") from exc
    return img


@dataclass(slots=True)
class _Candidate:
    quad: np.ndarray
    det_score: float
    crop_mode: bool


class OnnxRecognizer(Recognizer):
    """Chinese plate recognizer over the two vendored ONNX models.

    ``model_dir`` holds ``clp_det.onnx``, ``clp_v2_c_rec.onnx`` and ``clp_dict.txt`` (default:
    the copy shipped in this package). ``workers`` is the thread count of
    :meth:`recognize_batch` (default: the CPU count). Raises ``ConfigError`` when the models
    cannot be loaded.
    """

    name: ClassVar[str] = "onnx"
    batching: ClassVar[bool] = True

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        workers: int | None = None,
        options: PipelineOptions | None = None,
    ) -> None:
        files = ModelFiles.locate(model_dir)
        self.options = options or PipelineOptions()
        self._detector = PlateDetector(
            files.session(files.detector),
            max_sides=self.options.detect_sides,
            score_threshold=self.options.min_score,
            upscale_limit=self.options.upscale_limit,
        )
        self._reader = TextRecognizer(files.session(files.recognizer), files.load_charset())
        self.workers = max(1, workers or os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

    # -- public API -------------------------------------------------------------------------

    def recognize(self, image: ImageInput) -> list[DetectedPlate]:
        """Every plate found in ``image``, best detection first."""
        return self.read_array(decode_image(image.data))

    def recognize_batch(self, images: list[ImageInput]) -> list[list[DetectedPlate]]:
        """:meth:`recognize` for each image, spread over ``workers`` threads; same order."""
        if len(images) <= 1 or self.workers == 1:
            return [self.recognize(img) for img in images]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="onnx-recognizer")
        return list(self._pool.map(self.recognize, images))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def read_array(self, bgr: np.ndarray) -> list[DetectedPlate]:
        """Plates in a decoded BGR image (H, W, 3 uint8), best detection first."""
        plates = (self._read_candidate(bgr, cand) for cand in self._candidates(bgr))
        return [p for p in plates if p is not None]

    # -- steps ------------------------------------------------------------------------------

    def _looks_like_crop(self, width: int, height: int) -> bool:
        lo, hi = self.options.crop_aspect
        return height <= self.options.crop_max_height and lo <= width / max(height, 1) <= hi

    def _candidates(self, bgr: np.ndarray) -> list[_Candidate]:
        h, w = bgr.shape[:2]
        if self._looks_like_crop(w, h):
            return [_Candidate(_image_quad(w, h), 1.0, True)]
        return [_Candidate(order_corners(d.corners), d.score, False) for d in self._detector(bgr)]

    def _read_candidate(self, bgr: np.ndarray, cand: _Candidate) -> DetectedPlate | None:
        opts = self.options
        h, w = bgr.shape[:2]
        pw, ph = quad_size(cand.quad)
        if pw < 4 or ph < 2:
            return None
        if cand.crop_mode:
            colour, colour_prob = plate_colour(bgr)
            views = [
                cv2.resize(bgr, (max(8, round(w * st)), h)) if st != 1.0 else bgr
                for st in opts.crop_views
            ]
        else:
            colour, colour_prob = plate_colour(warp_quad(bgr, cand.quad, opts.warp_height))
            views = []
            # eight characters on a new-energy plate: a view with more room between them
            for mx, my, stretch in opts.green_views if colour == "green" else opts.views:
                region = expand_quad(cand.quad, mx, my)
                rw, rh = quad_size(region)
                aspect = rw / max(rh, 1.0) * stretch
                views.append(warp_quad(bgr, region, opts.warp_height, aspect=aspect))
        width = opts.crop_width if cand.crop_mode else opts.scene_width
        readings = self._read(views[:1], width=width)
        first = choose_text(readings, colour)
        # a sure, well-formed first view is the answer; otherwise the other views vote too
        sure = first is not None and first[1] >= opts.sure_prob and format_prior(first[2], colour) == 1.0
        if not sure:
            readings += self._read(views[1:], width=width)
        weights = [1.0] * len(readings)
        if pw / ph < opts.two_row_aspect:
            readings.append(self._read_two_rows(bgr, cand.quad))
            weights.append(float(len(views)))  # one two-row reading weighs as much as the views
        quad = cand.quad
        choice = choose_text(readings, colour, weights)
        if (choice is None or choice[2] is None) and colour == "yellow" and not cand.crop_mode:
            # a double-row plate whose detection holds only the lower row: look above it
            for share in opts.upper_row_shares:
                tall = extend_up(cand.quad, share)
                better = choose_text([self._read_two_rows(bgr, tall)], colour)
                if better is not None and better[2] is not None:
                    choice, quad = better, tall
                    break
        if choice is None:
            return None
        text, prob, fmt = choice
        if len(text) < opts.min_chars or (fmt is None and cand.det_score < 0.5 and prob < 0.3):
            return None  # a stray mark or a weak detection that reads as no plate
        plate_type, type_prob = classify_plate(text, fmt, colour, colour_prob)
        return DetectedPlate(
            text=text,
            prob=round(prob, 4),
            plate_type=plate_type,
            type_prob=round(type_prob, 4),
            polygon=clip_polygon(quad, w, h),  # type: ignore[arg-type]
            key_prob=round(cand.det_score, 4),
        )

    def _read_two_rows(self, bgr: np.ndarray, quad: np.ndarray) -> list[tuple[str, float]]:
        upper, lower = split_rows(warp_quad(bgr, quad, self.options.warp_height * 2))
        top, bottom = self._read([upper, lower], repair=False, width=self.options.scene_width)
        return join_rows(top[:4], bottom)

    def _read(
        self, crops: list[np.ndarray], repair: bool = True, width: int | None = None
    ) -> list[list[tuple[str, float]]]:
        """Candidate strings per crop. Crops run one at a time: on CPU this model is slower per
        crop in a batch (measured: 8.5 ms for one, 21 ms for two)."""
        charset, beam = self._reader.charset, self.options.beam
        out = []
        for crop in crops:
            probs = self._reader.probabilities([crop], width)[0]
            if repair:
                out.append(read_candidates(probs, charset, beam))
            else:
                out.append(ctc_beam_search(probs, charset, beam=beam))
        return out


def _image_quad(width: int, height: int) -> np.ndarray:
    return np.array(
        [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], dtype=np.float32
    )
