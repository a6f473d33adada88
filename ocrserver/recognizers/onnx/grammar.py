"""The national plate formats (GA 36), as regular expressions over the recognised string.

A string that fits no format is impossible on a real plate; the pipeline lowers its
confidence (:func:`plausibility`); ``decision`` tries one-character repairs first. The format
name also drives the plate type (see ``plate_type``).

Letters on plates exclude I and O. ``P`` below stands for a province abbreviation.
"""

from __future__ import annotations

import re

__all__ = [
    "FORMATS",
    "IMPOSSIBLE_FACTOR",
    "LETTERS",
    "PROVINCES",
    "match_format",
    "plausibility",
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


def match_format(text: str) -> str | None:
    """The name of the first format ``text`` fits, or None."""
    for name, pattern in FORMATS.items():
        if pattern.match(text):
            return name
    return None


def plausibility(text: str) -> float:
    """1.0 for a string that fits a plate format, :data:`IMPOSSIBLE_FACTOR` otherwise."""
    return 1.0 if match_format(text) else IMPOSSIBLE_FACTOR
