"""The product's plate classes (``PLATE_TYPES``) from a plate's format, colour and rows.

The string decides when it carries a marker (警, 学, 挂, 使/领, 港/澳, a military prefix, a
new-energy pattern); otherwise the background colour does: blue → 小型汽车, yellow →
大型汽车, green → 新能源车. Probabilities say how direct the evidence was (0..1).
"""

from __future__ import annotations

__all__ = ["classify_plate"]

_BY_FORMAT = {
    "hk_macau": "港澳车",
    "police": "警车",
    "consulate": "使领馆车",
    "embassy": "使领馆车",
    "embassy_old": "使领馆车",
    "learner": "教练车",
    "trailer": "挂车",
    "temporary": "临时车牌",
    "military": "军车",
    "nev_small": "新能源车",
    "nev_large": "新能源车",
}
_BY_COLOUR = {"blue": "小型汽车", "yellow": "大型汽车", "green": "新能源车"}


def classify_plate(
    text: str, fmt: str | None, colour: str, colour_prob: float
) -> tuple[str, float]:
    """(plate type, probability) for a read plate.

    ``fmt`` is :func:`grammar.match_format` of ``text``; ``colour`` one of
    ``colour.COLOURS`` with the confidence of that colour (0..1).
    """
    if fmt in _BY_FORMAT:
        # eight characters with D/F in a NEV position: a new-energy plate whatever its shade
        return _BY_FORMAT[fmt], 0.95
    if "警" in text:
        return "警车", 0.8
    if colour in _BY_COLOUR:
        kind = _BY_COLOUR[colour]
        if colour == "green" and len(text) == 7:
            # 7 characters on green: a misread NEV (8) or a yellow-green large plate
            return kind, 0.6
        return kind, min(0.95, colour_prob)
    if colour == "white":
        return "警车", 0.5
    # black plates (foreign-owned / cross-border) have no class of their own
    return "小型汽车", 0.4

