"""The run's books: what each run promised, what it answered, what it paid for, and what the
operator asked of it. Design note: ``ops/design/sink.md``.

* :mod:`.runs` — the run's facts in Redis, one writer each, and its state derived from them;
* :mod:`.outcomes` — which images have their outcome, one bit per ``(chunk, position)``;
* :mod:`.control` — the operator's pause and cancel, read by every admission;
* :mod:`.journal` — every paid answer, the moment it arrives, and the claims before each call;
* :mod:`.spill` — answers Redis could not take, on local disk until it can;
* :mod:`.queued` — the run's chunk messages alive on the broker;
* :mod:`.repair` — a stalled run's lost images, republished once.
"""
