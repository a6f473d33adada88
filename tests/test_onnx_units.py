"""Unit tests of the offline recognizer's pure parts: formats, types, CTC decoding, geometry."""

from __future__ import annotations

import numpy as np
import pytest

from ocrserver.recognizers.base import PLATE_TYPES
from ocrserver.recognizers.onnx.colour import plate_colour
from ocrserver.recognizers.onnx.decision import (
    NO_FORMAT_PRIOR,
    choose_text,
    format_prior,
    join_rows,
    substitutions,
)
from ocrserver.recognizers.onnx.grammar import match_format, plausibility
from ocrserver.recognizers.onnx.plate_type import classify_plate
from ocrserver.recognizers.onnx.recognition import ctc_beam_search, ctc_greedy_decode
from ocrserver.recognizers.onnx.rectify import (
    clip_polygon,
    expand_quad,
    extend_up,
    order_corners,
    quad_size,
    split_rows,
)

CHARSET = ["0", "1", "2", "A", "B", "D", "皖", "使", "警"]


@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        ("皖A12345", "standard"),
        ("京BX9Z7K", "standard"),
        ("皖AD12345", "nev_small"),
        ("沪AFA1234", "nev_small"),
        ("陕A06725D", "nev_large"),
        ("鄂F8888警", "police"),
        ("沪A1707领", "consulate"),
        ("琼A6716学", "learner"),
        ("苏E1234挂", "trailer"),
        ("粤ZR066港", "hk_macau"),
        ("粤Z1234澳", "hk_macau"),
        ("使198476", "embassy"),
        ("VA30093", "military"),
        ("皖1946673", "farm"),
        ("皖A1234", None),  # too short
        ("皖I12345", None),  # no I on plates
        ("皖AO1234", None),  # no O either
        ("A12345", None),
        ("沪AF7A123", None),  # NEV: only the 4th character may be a letter
        ("A皖12345", None),
    ],
)
def test_formats(text: str, fmt: str | None) -> None:
    assert match_format(text) == fmt
    assert plausibility(text) == (1.0 if fmt else 0.5)


@pytest.mark.parametrize(
    ("text", "colour", "expected"),
    [
        ("皖A12345", "blue", "小型汽车"),
        ("皖A12345", "yellow", "大型汽车"),
        ("皖AD12345", "green", "新能源车"),
        ("陕A06725D", "yellow", "新能源车"),  # large NEV plates are yellow-green
        ("苏E1234挂", "yellow", "挂车"),
        ("琼A6716学", "yellow", "教练车"),
        ("鄂F8888警", "white", "警车"),
        ("沪A1707领", "black", "使领馆车"),
        ("使198476", "black", "使领馆车"),
        ("粤ZR066港", "black", "港澳车"),
        ("VA30093", "white", "军车"),
        ("临A12345", "white", "临时车牌"),
    ],
)
def test_plate_type(text: str, colour: str, expected: str) -> None:
    kind, prob = classify_plate(text, match_format(text), colour, 0.9)
    assert kind == expected
    assert kind in PLATE_TYPES
    assert 0.0 < prob <= 1.0


def test_plate_type_falls_back_on_colour_with_lower_confidence() -> None:
    assert classify_plate("XYZ", None, "green", 0.9)[0] == "新能源车"
    kind, prob = classify_plate("XYZ", None, "black", 0.9)
    assert kind in PLATE_TYPES and prob < 0.5


def _probs(path: list[int], n_classes: int = len(CHARSET) + 1, p: float = 0.9) -> np.ndarray:
    """A CTC output following ``path`` (class per step) with probability ``p`` at each step."""
    out = np.full((len(path), n_classes), (1 - p) / (n_classes - 1), np.float32)
    for t, c in enumerate(path):
        out[t, c] = p
    return out


def test_greedy_merges_repeats_and_drops_blanks() -> None:
    # classes are 1-based into CHARSET: 7=皖, 4=A, 2=1
    reading = ctc_greedy_decode(_probs([0, 7, 7, 0, 4, 0, 2, 2, 0, 2, 0]), CHARSET)
    assert reading.text == "皖A11"
    assert reading.spans == ((1, 3), (4, 5), (6, 8), (9, 10))
    assert reading.prob == pytest.approx(0.9)


def test_beam_search_needs_a_blank_between_repeats() -> None:
    probs = _probs([2, 2, 2], p=0.98)
    texts = dict(ctc_beam_search(probs, CHARSET, beam=4))
    assert max(texts, key=lambda t: texts[t]) == "1"
    # "11" needs a blank step in between, which this output makes very unlikely
    assert texts.get("11", 0.0) < 0.05


def test_beam_search_sums_alignments() -> None:
    # two steps, each 0.5 "A" / 0.5 blank: "A" has three alignments (A_, _A, AA) = 0.75
    probs = np.zeros((2, len(CHARSET) + 1), np.float32)
    probs[:, 0] = 0.5
    probs[:, 4] = 0.5
    texts = dict(ctc_beam_search(probs, CHARSET))
    assert texts["A"] == pytest.approx(0.75)
    assert texts[""] == pytest.approx(0.25)


def test_substitutions_repair_one_character_to_fit_a_format() -> None:
    # greedy reads "皖246357"-like "皖1000"... build: 皖 2 1 0 0 0 0 → invalid; 使 is second best
    charset = [*"0123456789", "皖", "使", "A"]
    idx = {c: i + 1 for i, c in enumerate(charset)}
    path = [idx["皖"], 0, idx["2"], 0, idx["4"], 0, idx["6"], 0, idx["3"], 0, idx["5"], 0, idx["7"]]
    probs = _probs(path, n_classes=len(charset) + 1, p=0.8)
    probs[0, idx["使"]] = 0.15
    probs[0] /= probs[0].sum()
    out = dict(substitutions(probs, charset))
    assert "使246357" in out
    assert all(match_format(t) for t in out)


def test_choose_text_prefers_valid_strings_and_votes() -> None:
    readings = [[("A5331", 0.9)], [("A5331", 0.8)], [("京EA5331", 0.3)]]
    text, prob, fmt = choose_text(readings, "yellow")  # type: ignore[misc]
    assert (text, fmt) == ("京EA5331", "standard")
    assert prob == pytest.approx(0.3)
    only_invalid = choose_text([[("A5331", 0.9)]], "yellow")
    assert only_invalid is not None and only_invalid[2] is None and only_invalid[1] == pytest.approx(0.45)
    assert choose_text([[("", 0.9)]], "blue") is None
    assert format_prior(None, "blue") == NO_FORMAT_PRIOR
    assert format_prior("standard", "green") < format_prior("nev_small", "green")


def test_join_rows_multiplies() -> None:
    joined = join_rows([("京E", 0.5), ("京", 0.3)], [("A5331", 0.8)])
    assert joined[0] == ("京EA5331", pytest.approx(0.4))
    assert len(joined) == 2


def test_corner_order_and_geometry() -> None:
    # detector order: BR, BL, TL, TR
    model = np.array([[110, 40], [10, 42], [12, 10], [108, 8]], np.float32)
    quad = order_corners(model)
    assert quad.tolist() == [[12, 10], [108, 8], [110, 40], [10, 42]]
    w, h = quad_size(quad)
    assert 95 < w < 100 and 31 < h < 33
    grown = expand_quad(quad, 0.1, 0.0)
    assert quad_size(grown)[0] == pytest.approx(w * 1.2, rel=1e-3)
    tall = extend_up(quad, 0.5)
    assert quad_size(tall)[1] == pytest.approx(h * 1.5, rel=1e-2)
    # a scrambled order falls back to geometry
    scrambled = order_corners(np.array([[12, 10], [110, 40], [108, 8], [10, 42]], np.float32))
    assert scrambled.tolist() == quad.tolist()
    assert clip_polygon(np.array([[-5, -3], [120, 0], [130, 70], [0, 60]], np.float32), 100, 50) == (
        (0, 0), (99, 0), (99, 49), (0, 49))


def test_split_rows_shapes() -> None:
    plate = np.zeros((100, 200, 3), np.uint8)
    upper, lower = split_rows(plate)
    assert upper.shape[0] == 40 and lower.shape[0] == 67
    assert upper.shape[1] < 200 == lower.shape[1]


@pytest.mark.parametrize(
    ("ground", "ink", "expected"),
    [
        ((180, 60, 10), (255, 255, 255), "blue"),  # BGR
        ((20, 190, 236), (0, 0, 0), "yellow"),
        ((90, 190, 60), (0, 0, 0), "green"),
        ((236, 238, 238), (0, 0, 0), "white"),
        ((18, 18, 20), (255, 255, 255), "black"),
    ],
)
def test_plate_colour(ground: tuple[int, int, int], ink: tuple[int, int, int], expected: str) -> None:
    plate = np.zeros((48, 150, 3), np.uint8)
    plate[:] = ground
    for x in range(15, 140, 18):  # character strokes cover about a third
        plate[10:38, x : x + 6] = ink
    colour, confidence = plate_colour(plate)
    assert colour == expected
    assert 0.5 <= confidence <= 1.0
