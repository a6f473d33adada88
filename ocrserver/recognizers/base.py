"""The recognizer interface behind ``carnumber serve``.

The server decodes and checks the image, then hands a :class:`ImageInput` to a recognizer and
turns the :class:`DetectedPlate` list it returns into the service's envelope. A recognizer is
synchronous and CPU-bound; the server runs it off the event loop. One that gains from batching
overrides :meth:`Recognizer.recognize_batch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

__all__ = ["PLATE_TYPES", "DetectedPlate", "ImageInput", "Recognizer"]

# The classes the product names for secondary_cls.type_str.
PLATE_TYPES = (
    "大型汽车",
    "小型汽车",
    "新能源车",
    "挂车",
    "临时车牌",
    "警车",
    "军车",
    "使领馆车",
    "教练车",
    "港澳车",
)

Point = tuple[int, int]


@dataclass(frozen=True, slots=True)
class ImageInput:
    """A checked image: its bytes, decoded size, where it came from and its SHA-256 (hex)."""

    data: bytes
    width: int
    height: int
    sha256: str
    url: str | None = None
    name: str | None = None  # file name, when the caller knows one (replay lookups)


@dataclass(frozen=True, slots=True)
class DetectedPlate:
    text: str
    prob: float  # 0..1, confidence of the text
    plate_type: str  # one of PLATE_TYPES
    type_prob: float  # 0..1
    polygon: tuple[Point, Point, Point, Point]  # TL, TR, BR, BL in original-image pixels
    key_prob: float = 1.0


class Recognizer:
    """Base class: subclasses set ``name`` and implement :meth:`recognize`."""

    name: ClassVar[str] = ""

    def recognize(self, image: ImageInput) -> list[DetectedPlate]:
        raise NotImplementedError

    def recognize_batch(self, images: list[ImageInput]) -> list[list[DetectedPlate]]:
        return [self.recognize(img) for img in images]

    def close(self) -> None:
        """Release models, pools or files."""
