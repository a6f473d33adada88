"""Choosing a plate's text from several readings, with the national formats as a prior.

Each reading (one straightened crop, or the two rows of a double-row plate joined) gives a
few candidate strings with their probabilities. A string's score is the sum of its
probabilities over readings (readings vote) times a prior: a string that fits no format is
unlikely, and so is a format at odds with the plate's colour (a 7-character string on a green
new-energy plate usually lost a repeated digit).
"""

from __future__ import annotations

from collections.abc import Sequence

from .grammar import IMPOSSIBLE_FACTOR, match_format

__all__ = ["Choice", "choose_text", "format_prior", "join_rows"]

Candidates = Sequence[tuple[str, float]]
Choice = tuple[str, float, str | None]  # text, probability 0..1, format name

_NEV = frozenset({"nev_small", "nev_large"})
# selection priors: a string no plate can carry loses to almost any string one can
NO_FORMAT_PRIOR = 0.05
MISMATCH_PRIOR = 0.6


def format_prior(fmt: str | None, colour: str) -> float:
    """Prior weight (0..1] of a string of format ``fmt`` on a plate of ``colour``."""
    if fmt is None:
        return NO_FORMAT_PRIOR
    if colour == "green" and fmt == "standard":
        return MISMATCH_PRIOR
    if colour == "blue" and fmt in _NEV:
        return MISMATCH_PRIOR
    return 1.0


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
