"""Fonts shipped as package data: a subset of Noto Sans SC for drawing plate characters.

``NotoSansSC-PlateSubset.otf`` holds only the glyphs plates use (province abbreviations,
使领学警挂港澳临时民航军, digits, Latin capitals, the middle dot). It is a fontTools subset
of Noto Sans SC Regular 2.004 (© 2014-2021 Adobe, SIL Open Font License 1.1, licence in
``LICENSE-OFL.txt``), taken from the PyPI wheel ``pylopdf-fonts-zh-cn`` 0.1.1; see ``NOTICE``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PLATE_FONT", "plate_font_path"]

PLATE_FONT = "NotoSansSC-PlateSubset.otf"


def plate_font_path() -> Path:
    """Path of the vendored plate-character font."""
    return Path(__file__).resolve().parent / PLATE_FONT
