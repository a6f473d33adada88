"""Choosing a plate's text from several readings, with the national formats as a prior.

Each reading (one straightened crop, or the two rows of a double-row plate joined) gives a
few candidate strings with their probabilities. A string's score is the sum of its
probabilities over readings (readings vote) times a prior: a string that fits no format is
unlikely, and so is a format at odds with the plate's colour (a 7-character string on a green
new-energy plate usually lost a repeated digit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .grammar import IMPOSSIBLE_FACTOR, match_format
from .recognition import ctc_beam_search, ctc_greedy_decode

__all__ = ["Choice", "choose_text", "format_prior", "join_rows", "read_candidates", "substitutions"]

Candidates = Sequence[tuple[str, float]]
Choice = tuple[str, float, str | None]  # text, probability 0..1, format name

_NEV = frozenset({"nev_small", "nev_large"})
# selection priors: a string no plate can carry loses to any string one can
NO_FORMAT_PRIOR = 1e-3
MISMATCH_PRIOR = 0.6
# formats rare on the road, which misreads of common ones easily fit (皖 + 7 digits)
RARE_PRIOR = {"farm": 0.1}
# a character read with at least this probability is taken as read
SURE = 0.95


def format_prior(fmt: str | None, colour: str) -> float:
    """Prior weight (0..1] of a string of format ``fmt`` on a plate of ``colour``."""
    if fmt is None:
        return NO_FORMAT_PRIOR
    if colour == "green" and fmt == "standard":
        return MISMATCH_PRIOR
    if colour == "blue" and fmt in _NEV:
        return MISMATCH_PRIOR
    return RARE_PRIOR.get(fmt, 1.0)


def substitutions(
    probs: np.ndarray, charset: list[str], *, alternatives: int = 4
) -> list[tuple[str, float]]:
    """Strings that fit a format and differ from the greedy reading in one character.

    For each character of the greedy path, the ``alternatives`` next most probable classes at
    its most confident step are tried in its place. A candidate's probability is the product
    of its characters' step probabilities (comparable to the beam's). Empty when the greedy
    reading already fits a format.
    """
    greedy = ctc_greedy_decode(probs, charset)
    if not greedy.text or match_format(greedy.text):
        return []
    index = {c: i + 1 for i, c in enumerate(charset)}
    base = math.prod(greedy.char_probs)
    out: dict[str, float] = {}
    for pos, (start, end) in enumerate(greedy.spans):
        own = index[greedy.text[pos]]
        step = start + int(np.argmax(probs[start:end, own]))
        row = probs[step]
        for cls in np.argsort(row)[::-1][: alternatives + 2]:
            cls = int(cls)
            if cls in (0, own):
                continue
            text = greedy.text[:pos] + charset[cls - 1] + greedy.text[pos + 1 :]
            if match_format(text):
                p = base / max(greedy.char_probs[pos], 1e-9) * float(row[cls])
                out[text] = max(out.get(text, 0.0), p)
    return sorted(out.items(), key=lambda kv: kv[1], reverse=True)


def read_candidates(probs: np.ndarray, charset: list[str], beam: int = 8) -> list[tuple[str, float]]:
    """Beam candidates of one reading, plus one-character repairs when none fits a format.

    A confident greedy reading that fits a format (every character ≥ ``SURE``) is returned
    alone: the beam would only add strings orders of magnitude less likely.
    """
    greedy = ctc_greedy_decode(probs, charset)
    if greedy.char_probs and min(greedy.char_probs) >= SURE and match_format(greedy.text):
        return [(greedy.text, math.prod(greedy.char_probs))]
    cands = ctc_beam_search(probs, charset, beam=beam)
    if not any(match_format(text) for text, _ in cands):
        cands += substitutions(probs, charset)
    return cands


def join_rows(upper: Candidates, lower: Candidates, keep: int = 8) -> list[tuple[str, float]]:
    """Candidates of a two-row plate: every upper × lower pair, probabilities multiplied."""
    pairs = [(u + lo, pu * pl) for u, pu in upper for lo, pl in lower]
    pairs.sort(key=lambda kv: kv[1], reverse=True)
    return pairs[:keep]


def choose_text(
    readings: Sequence[Candidates], colour: str, weights: Sequence[float] | None = None
) -> Choice | None:
    """The best string over ``readings`` (each weighted, default 1); None when none has text.

    The returned probability is the string's best single-reading probability times its
    format plausibility (1 when it fits a format, :data:`IMPOSSIBLE_FACTOR` otherwise).
    """
    votes: dict[str, float] = {}
    best_p: dict[str, float] = {}
    for i, cands in enumerate(readings):
        weight = weights[i] if weights is not None else 1.0
        for text, p in cands:
            if not text:
                continue
            votes[text] = votes.get(text, 0.0) + p * weight
            best_p[text] = max(best_p.get(text, 0.0), p)
    if not votes:
        return None
    formats = {text: match_format(text) for text in votes}
    text = max(votes, key=lambda t: votes[t] * format_prior(formats[t], colour))
    fmt = formats[text]
    prob = min(1.0, best_p[text]) * (1.0 if fmt else IMPOSSIBLE_FACTOR)
    return text, prob, fmt
