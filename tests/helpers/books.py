"""Seed a run's books in tests: images with their outcome, the way a worker records them."""

from __future__ import annotations

from workers.books.outcomes import Outcome, OutcomeBook
from workers.books.runs import RunStore


def answer(
    store: RunStore, run_id: str, chunk_id: str, images: int, failed: int = 0, plates: int = 0, start: int = 0
) -> int:
    """Record ``images`` images of ``chunk_id`` (positions ``start``…) as answered: the first
    ``failed`` of them failed, ``plates`` plates spread over the others. Returns how many were new."""
    ok = max(1, images - failed)
    outcomes = [
        Outcome(
            start + i,
            i < failed,
            0 if i < failed else plates // ok + (1 if (i - failed) < plates % ok else 0),
        )
        for i in range(images)
    ]
    return OutcomeBook(store.r, store.keys).mark(run_id, chunk_id, outcomes)
