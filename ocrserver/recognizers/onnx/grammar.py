"""The national plate formats (GA 36), as regular expressions over the recognised string.

A string that fits no format is impossible on a real plate; the pipeline lowers its
confidence (:func:`plausibility`) and tries small repairs first (:func:`repair`). The format
name also drives the plate type (see ``plate_type``).

Letters on plates exclude I and O. ``P`` below stands for a province abbreviation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "FORMATS",
    "LETTERS",
    "PROVINCES",
    "is_province",
    "match_format",
    "plausibility",
    "repair",
]

PROVINCES = "京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼"
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
_P = f"[{PROVINCES}]"
_L = f"[{LETTERS}]"
_AN = f"[{LETTERS}0-9]"

# name -> pattern; the first that matches names the format (more specific ones first).
FORMATS: dict[str, re.Pattern[str]] = {
    name: re.compile(pattern)
    for name, pattern in (
        ("hk_macau", f"^粤Z{_AN}{{4}}[港澳]$"),
        ("police", f"^{_P}{_L}{_AN}{{4}}警$"),
        ("consulate", f"^{_P}{_L}{_AN}{{4}}领$"),
        ("embassy", "^使[0-9]{6}$"),
        ("embassy_old", f"^使{_AN}{{5}}$"),
        ("learner", f"^{_P}{_L}{_AN}{{4}}学$"),
        ("trailer", f"^{_P}{_L}{_AN}{{4}}挂$"),
        ("temporary", f"^临{_P}?{_AN}{{5,7}}$"),
        ("nev_small", f"^{_P}{_L}[DF]{_AN}[0-9]{{4}}$"),
        ("nev_large", f"^{_P}{_L}[0-9]{{5}}[DF]$"),
        ("military", f"^{_L}{{2}}[0-9]{{5}}$"),
        ("farm", f"^{_P}[0-9]{{7}}$"),
        ("standard", f"^{_P}{_L}{_AN}{{5}}$"),
    )
}

# how much a string that fits no format keeps of its confidence
IMPOSSIBLE_FACTOR = 0.5


def is_province(char: str) -> bool:
    """True for one of the 31 province abbreviations."""
    return len(char) == 1 and char in PROVINCES


def match_format(text: str) -> str | None:
    """The name of the first format ``text`` fits, or None."""
    for name, pattern in FORMATS.items():
        if pattern.match(text):
            return name
    return None


def plausibility(text: str) -> float:
    """1.0 for a string that fits a plate format, :data:`IMPOSSIBLE_FACTOR` otherwise."""
    return 1.0 if match_format(text) else IMPOSSIBLE_FACTOR


def repair(text: str, char_probs: Sequence[float]) -> tuple[str, tuple[float, ...]] | None:
    """Drop the one least-confident extra character when that makes an impossible string valid.

    CTC readers sometimes emit a spurious character at a plate's edge (a bolt, the border, a
    split glyph). Only single deletions are tried, least probable first, and only for strings
    longer than the shortest format; returns None when no single deletion helps.
    """
    if match_format(text) or len(text) <= 7:
        return None
    for i in sorted(range(len(text)), key=lambda k: char_probs[k]):
        candidate = text[:i] + text[i + 1 :]
        if match_format(candidate):
            return candidate, tuple(p for k, p in enumerate(char_probs) if k != i)
    return None
