"""A generated archive of synthetic traffic-camera images of Chinese plates, with their truth.

:func:`generate_archive` draws plates to the GA 36 layouts (440×140 mm single row, 480×140 mm
new-energy, 440×220 mm double row; the dot after the second character), in the usual colours
(blue/white, yellow/black, green gradient/black, white/black with red markers, black/white),
with valid random strings of several types, and puts one or two of them into a synthetic
scene with perspective, blur, lighting and noise. Each image is a JPEG that carries its own
truth (``ocrserver.truth.embed_truth``) so the replay recognizer answers it too; ``truth.jsonl``
lists ``{"name", "sha256", "plates": [{"text", "type", "polygon"}]}`` per image.

Only Pillow is needed. Characters come from the vendored Noto Sans SC subset
(``ocrserver/fonts``). A 640×480 image takes a few milliseconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ocrserver.fonts import plate_font_path
from ocrserver.truth import embed_truth

__all__ = [
    "PlateTruth",
    "SampleTruth",
    "generate_archive",
    "random_plate",
    "read_rate",
    "render_plate",
]

PROVINCES = "京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼"
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
DIGITS = "0123456789"
RGB = tuple[int, int, int]
Point = tuple[int, int]

BLUE: RGB = (12, 62, 178)
YELLOW: RGB = (236, 186, 20)
WHITE: RGB = (238, 238, 236)
BLACK: RGB = (18, 18, 20)
RED: RGB = (196, 20, 24)
GREEN_TOP: RGB = (226, 246, 226)
GREEN_BOTTOM: RGB = (64, 190, 96)


@dataclass(frozen=True, slots=True)
class PlateTruth:
    """One plate in a generated image: text, product type, corners (TL, TR, BR, BL) in pixels."""

    text: str
    plate_type: str
    polygon: tuple[Point, Point, Point, Point]

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "type": self.plate_type, "polygon": [list(p) for p in self.polygon]}


@dataclass(frozen=True, slots=True)
class SampleTruth:
    """One generated image: file name, SHA-256 (hex) of its bytes, its plates."""

    name: str
    sha256: str
    plates: tuple[PlateTruth, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "plates": [p.to_json() for p in self.plates]}


@dataclass(frozen=True, slots=True)
class _Style:
    plate_type: str
    layout: str  # single | nev | double
    ground: RGB | None  # None: the green new-energy gradient
    ink: RGB
    red: frozenset[int] = frozenset()  # character positions drawn in red


def _an(rng: random.Random, n: int, max_letters: int = 2) -> str:
    out = [rng.choice(DIGITS) for _ in range(n)]
    for i in rng.sample(range(n), rng.randint(0, min(max_letters, n))):
        out[i] = rng.choice(LETTERS)
    return "".join(out)


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(n))


# (weight, maker): relative frequencies loosely like a city camera's
_KINDS: tuple[tuple[int, str], ...] = (
    (40, "blue"), (12, "yellow"), (8, "yellow_double"), (20, "green"), (4, "trailer"),
    (4, "learner"), (4, "police"), (2, "consulate"), (2, "hk_macau"), (2, "military"),
    (2, "embassy"),
)


def random_plate(rng: random.Random, kind: str | None = None) -> tuple[str, _Style]:
    """A valid random plate string of ``kind`` (default: drawn by frequency) and its style."""
    if kind is None:
        kind = rng.choices([k for _, k in _KINDS], weights=[w for w, _ in _KINDS])[0]
    p, letter = rng.choice(PROVINCES), rng.choice(LETTERS)
    if kind == "blue":
        return p + letter + _an(rng, 5), _Style("小型汽车", "single", BLUE, WHITE)
    if kind == "yellow":
        return p + letter + _an(rng, 5), _Style("大型汽车", "single", YELLOW, BLACK)
    if kind == "yellow_double":
        return p + letter + _an(rng, 5, 1), _Style("大型汽车", "double", YELLOW, BLACK)
    if kind == "green":
        text = p + letter + rng.choice("DF") + _an(rng, 1, 1) + _digits(rng, 4)
        return text, _Style("新能源车", "nev", None, BLACK)
    if kind == "trailer":
        return p + letter + _an(rng, 4, 1) + "挂", _Style("挂车", "double", YELLOW, BLACK)
    if kind == "learner":
        return p + letter + _digits(rng, 4) + "学", _Style("教练车", "single", YELLOW, BLACK)
    if kind == "police":
        return p + letter + _digits(rng, 4) + "警", _Style("警车", "single", WHITE, BLACK, frozenset({6}))
    if kind == "consulate":
        return p + letter + _digits(rng, 4) + "领", _Style("使领馆车", "single", BLACK, WHITE, frozenset({6}))
    if kind == "hk_macau":
        text = "粤Z" + _an(rng, 4, 1) + rng.choice("港澳")
        return text, _Style("港澳车", "single", BLACK, WHITE)
    if kind == "military":
        text = rng.choice(LETTERS) + rng.choice(LETTERS) + _digits(rng, 5)
        return text, _Style("军车", "single", WHITE, BLACK, frozenset({0, 1}))
    if kind == "embassy":
        return "使" + _digits(rng, 6), _Style("使领馆车", "single", BLACK, WHITE, frozenset({0}))
    raise ValueError(f"unknown plate kind {kind!r}")


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(plate_font_path()), size)


@lru_cache(maxsize=2048)
def _glyph(char: str, width: int, height: int) -> Image.Image:
    """An ``L`` mask of ``char`` stretched to fill width×height (plate fonts are condensed)."""
    size = 96
    font = _font(size)
    canvas = Image.new("L", (size * 2, size * 2), 0)
    ImageDraw.Draw(canvas).text((size // 2, size // 2), char, fill=255, font=font,
                                stroke_width=4 if char.isascii() else 3, stroke_fill=255)
    box = canvas.getbbox() or (0, 0, 1, 1)
    return canvas.crop(box).resize((width, height), Image.Resampling.BILINEAR)


def _slots(layout: str, n: int) -> tuple[tuple[int, int], list[tuple[int, int, int, int]], list[Point]]:
    """Plate size (mm) and each character's box (x, y, w, h) and the dot centres."""
    if layout == "double":
        upper = [(112, 18, 80, 58), (248, 18, 80, 58)]
        lower = [(28 + i * 79, 92, 64, 108) for i in range(n - 2)]
        return (440, 220), upper + lower, [(220, 47)]
    if layout == "nev":
        xs, x = [], 26
        for i in range(n):
            xs.append(x)
            x += (45 if i == 0 else 43) + (28 if i == 1 else 9)
        boxes = [(x, 25, 45 if i == 0 else 43, 90) for i, x in enumerate(xs)]
        return (480, 140), boxes, [(xs[2] - 14, 70)]
    xs, x = [], 16
    for i in range(n):
        xs.append(x)
        x += 45 + (34 if i == 1 else 12)
    return (440, 140), [(x, 25, 45, 90) for x in xs], [(xs[2] - 17, 70)]


def render_plate(text: str, style: _Style) -> Image.Image:
    """The plate drawn at 1 px per mm (RGB), e.g. 440×140 for a single-row plate."""
    (w, h), boxes, dots = _slots(style.layout, len(text))
    if style.ground is None:
        top = Image.new("RGB", (w, h), GREEN_TOP)
        bottom = Image.new("RGB", (w, h), GREEN_BOTTOM)
        plate = Image.composite(bottom, top, Image.linear_gradient("L").resize((w, h)))
    else:
        plate = Image.new("RGB", (w, h), style.ground)
    draw = ImageDraw.Draw(plate)
    draw.rounded_rectangle((4, 4, w - 5, h - 5), radius=10, outline=style.ink, width=3)
    for i, (char, (x, y, cw, ch)) in enumerate(zip(text, boxes, strict=True)):
        ink = RED if i in style.red else style.ink
        plate.paste(Image.new("RGB", (cw, ch), ink), (x, y), _glyph(char, cw, ch))
    for cx, cy in dots:
        draw.ellipse((cx - 5, cy - 5, cx + 5, cy + 5), fill=style.ink)
    return plate


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for a small dense system."""
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[piv] = m[piv], m[col]
        for r in range(n):
            if r != col and m[r][col]:
                f = m[r][col] / m[col][col]
                m[r] = [vr - f * vc for vr, vc in zip(m[r], m[col], strict=True)]
    return [m[i][n] / m[i][i] for i in range(n)]


def _perspective_coeffs(
    dst: Sequence[tuple[float, float]], src: Sequence[tuple[float, float]]
) -> list[float]:
    """Pillow PERSPECTIVE coefficients mapping output points ``dst`` to input points ``src``."""
    a, b = [], []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b += [u, v]
    return _solve(a, b)


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    """Soft shapes in car-body and street colours, drawn small and enlarged (cheap blur)."""
    sw, sh = max(8, width // 4), max(8, height // 4)
    base = tuple(rng.randint(40, 200) for _ in range(3))
    img = Image.new("RGB", (sw, sh), base)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 8)):
        x0, y0 = rng.randint(-12, sw), rng.randint(-12, sh)
        x1, y1 = x0 + rng.randint(10, sw // 2), y0 + rng.randint(8, sh // 2)
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.rectangle if rng.random() < 0.6 else draw.ellipse)((x0, y0, x1, y1), fill=colour)
    return img.resize((width, height), Image.Resampling.BILINEAR)


@lru_cache(maxsize=4)
def _noise_field(width: int, height: int) -> Image.Image:
    """Grey Gaussian noise twice the image size; scenes crop a random window of it."""
    return Image.effect_noise((width * 2, height * 2), 40).convert("RGB")


def _tone_lut(brightness: float, contrast: float) -> list[int]:
    """A per-channel lookup table applying brightness then contrast about mid-grey."""
    lut = [min(255, max(0, round((v * brightness - 128) * contrast + 128))) for v in range(256)]
    return lut * 3


def _place(rng: random.Random, plate_size: tuple[int, int], width: int, height: int,
           band: tuple[float, float]) -> list[tuple[float, float]]:
    """A perspective quad (TL, TR, BR, BL) for a plate, inside the image and a vertical band."""
    pw, ph = plate_size
    target_w = rng.uniform(0.22, 0.42) * width
    scale = target_w / pw
    w, h = pw * scale, ph * scale
    cx = rng.uniform(w / 2 + 8, width - w / 2 - 8)
    cy = rng.uniform(band[0] * height + h / 2 + 8, band[1] * height - h / 2 - 8)
    angle = rng.uniform(-0.12, 0.12)
    skew = rng.uniform(-0.12, 0.12) * h  # left/right edges of different height: yaw
    ca, sa = math.cos(angle), math.sin(angle)
    corners = [(-w / 2, -h / 2 - skew / 2), (w / 2, -h / 2 + skew / 2),
               (w / 2, h / 2 - skew / 2), (-w / 2, h / 2 + skew / 2)]
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in corners]


def _scene(rng: random.Random, plates: list[tuple[str, _Style]], width: int, height: int,
           quality: int) -> tuple[bytes, list[PlateTruth]]:
    img = _background(rng, width, height)
    truths = []
    bands = [(0.0, 1.0)] if len(plates) == 1 else [(0.0, 0.5), (0.5, 1.0)]
    blur = rng.uniform(0.0, 1.1)  # scene pixels
    for (text, style), band in zip(plates, bands, strict=True):
        plate = render_plate(text, style)
        quad = _place(rng, plate.size, width, height, band)
        # blur the plate before warping it: the same softness at a fraction of the cost
        scale = math.dist(quad[0], quad[1]) / plate.size[0]
        if blur > 0.2:
            plate = plate.filter(ImageFilter.GaussianBlur(blur / max(scale, 0.05)))
        pw, ph = plate.size
        # warp into the quad's bounding box only, then paste there
        x0 = max(0, math.floor(min(x for x, _ in quad)))
        y0 = max(0, math.floor(min(y for _, y in quad)))
        x1 = min(width, math.ceil(max(x for x, _ in quad)) + 1)
        y1 = min(height, math.ceil(max(y for _, y in quad)) + 1)
        local = [(x - x0, y - y0) for x, y in quad]
        coeffs = _perspective_coeffs(local, [(0, 0), (pw, 0), (pw, ph), (0, ph)])
        size = (x1 - x0, y1 - y0)
        layer = plate.transform(size, Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR)
        mask = Image.new("L", plate.size, 255).transform(
            size, Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR)
        img.paste(layer, (x0, y0), mask)
        polygon = tuple((round(x), round(y)) for x, y in quad)
        truths.append(PlateTruth(text, style.plate_type, polygon))  # type: ignore[arg-type]
    img = img.point(_tone_lut(rng.uniform(0.65, 1.25), rng.uniform(0.7, 1.15)))
    nx, ny = rng.randint(0, width), rng.randint(0, height)
    noise = _noise_field(width, height).crop((nx, ny, nx + width, ny + height))
    img = Image.blend(img, noise, rng.uniform(0.03, 0.12))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), truths


def generate_archive(out_dir: str | Path, count: int, seed: int = 0, *,
                     width: int = 640, height: int = 480) -> list[SampleTruth]:
    """Write ``count`` JPEG scenes and ``truth.jsonl`` into ``out_dir``; same seed, same files.

    Names are ``sample_00000.jpg`` upwards; about one image in six shows two plates.
    Returns the truth of every image, in order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    truths: list[SampleTruth] = []
    with (out / "truth.jsonl").open("w", encoding="utf-8") as fh:
        for i in range(count):
            n = 2 if rng.random() < 1 / 6 else 1
            data, plates = _scene(rng, [random_plate(rng) for _ in range(n)], width, height,
                                  rng.randint(72, 92))
            data = embed_truth(data, [p.to_json() for p in plates])
            sample = SampleTruth(f"sample_{i:05d}.jpg", hashlib.sha256(data).hexdigest(), tuple(plates))
            (out / sample.name).write_bytes(data)
            fh.write(json.dumps(sample.to_json(), ensure_ascii=False) + "\n")
            truths.append(sample)
    return truths


def read_rate(recognizer: Any, out_dir: str | Path, truths: Sequence[SampleTruth]) -> float:
    """Share of generated plates (0..1) that ``recognizer`` reads exactly, any order per image."""
    from ocrserver.recognizers.base import ImageInput

    total = hits = 0
    for sample in truths:
        data = (Path(out_dir) / sample.name).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
        found = {p.text for p in recognizer.recognize(ImageInput(data, width, height, sample.sha256,
                                                                 name=sample.name))}
        total += len(sample.plates)
        hits += sum(p.text in found for p in sample.plates)
    return hits / total if total else 0.0


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m ocrserver.samples DIR [--count N] [--seed S] [--read]``: write an archive and,
    with ``--read``, print how many of its plates the offline recognizer reads exactly."""
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python -m ocrserver.samples")
    parser.add_argument("out_dir")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--read", action="store_true", help="measure the onnx recognizer's read rate")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    truths = generate_archive(args.out_dir, args.count, args.seed)
    elapsed_ms = (time.perf_counter() - start) * 1000 / max(args.count, 1)
    plates = sum(len(s.plates) for s in truths)
    print(f"{len(truths)} images, {plates} plates in {args.out_dir} ({elapsed_ms:.1f} ms/image)")
    if args.read:
        from ocrserver.recognizers.onnx import OnnxRecognizer

        recognizer = OnnxRecognizer()
        try:
            rate = read_rate(recognizer, args.out_dir, truths)
        finally:
            recognizer.close()
        print(f"onnx recognizer read {rate:.1%} of the plates exactly")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
