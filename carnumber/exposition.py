"""A :class:`~carnumber.monitor.Snapshot` as Prometheus metric families (needs ``prometheus-client``,
the ``monitor`` extra; import this module only where it is wanted).

Every metric is named ``carnumber_*``; the names, types and labels are listed in ``ops/README.md``
and used by ``ops/prometheus/alerts.yml``. Values that only grow within a run (images written,
plates, calls, cost) are counters, so ``increase()`` works on them; the rest are gauges. Labels hold
run ids, account tags (a digest, never the AccessKeyId), queue names and API codes: no secrets.
The price and each run's cost (calls x price / 1000, as ``carnumber status`` and ``report`` count
it) are exported only when ``CARNUMBER_PRICE_PER_1000_CALLS`` is set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from carnumber.monitor import AccountSnapshot, Snapshot
from workers.books.runs import STATES, RunSummary

__all__ = ["CIRCUIT_STATES", "SnapshotCollector", "families"]

CIRCUIT_STATES = ("closed", "open", "half_open")

# run hash field -> (metric name without _total, help)
_RUN_COUNTERS = (
    ("images_enqueued", "carnumber_run_images_enqueued", "Images published to the queue for the run"),
    ("images_written", "carnumber_run_images_written", "Images with an outcome written to Parquet"),
    ("images_failed", "carnumber_run_images_failed", "Images written with status failed"),
    ("images_skipped", "carnumber_run_images_skipped", "Images the producer skipped when enqueuing"),
    ("plates", "carnumber_run_plates", "Plates recognised in the run"),
    ("calls", "carnumber_run_calls", "API calls made for the run (counted as they are made)"),
)


def _float(fields: dict[str, str], name: str) -> float:
    try:
        return float(fields.get(name, 0) or 0)
    except ValueError:
        return 0.0


def _run_families(runs: tuple[RunSummary, ...], price_per_1000_calls: float | None) -> Iterator[Metric]:
    state = GaugeMetricFamily(
        "carnumber_run_state", "1 for the run's current state, 0 for the others", labels=["run_id", "state"]
    )
    counters = {
        field: CounterMetricFamily(name, text, labels=["run_id"]) for field, name, text in _RUN_COUNTERS
    }
    parked = GaugeMetricFamily(
        "carnumber_run_images_parked", "Images set aside until carnumber resume", labels=["run_id"]
    )
    outstanding = GaugeMetricFamily(
        "carnumber_run_images_outstanding",
        "Images enqueued and neither written nor parked (queued or in flight)",
        labels=["run_id"],
    )
    created = GaugeMetricFamily(
        "carnumber_run_created_timestamp_seconds", "When the run was created", labels=["run_id"]
    )
    updated = GaugeMetricFamily(
        "carnumber_run_updated_timestamp_seconds", "Last state change of the run", labels=["run_id"]
    )
    price = GaugeMetricFamily(
        "carnumber_price_per_1000_calls", "Price of 1000 API calls (CARNUMBER_PRICE_PER_1000_CALLS)"
    )
    cost = CounterMetricFamily(
        "carnumber_run_cost",
        "API cost of the run's calls (calls x price / 1000), in the currency of the price",
        labels=["run_id"],
    )
    for run in runs:
        states = STATES if run.state in STATES else (*STATES, run.state)
        for s in states:
            state.add_metric([run.run_id, s], 1.0 if s == run.state else 0.0)
        for field, family in counters.items():
            family.add_metric([run.run_id], _float(run.fields, field))
        parked.add_metric([run.run_id], run.parked)
        outstanding.add_metric([run.run_id], run.outstanding)
        created.add_metric([run.run_id], _float(run.fields, "created_at"))
        updated.add_metric([run.run_id], _float(run.fields, "updated_at"))
        if price_per_1000_calls is not None:
            cost.add_metric([run.run_id], _float(run.fields, "calls") * price_per_1000_calls / 1000)
    yield state
    yield from counters.values()
    yield from (parked, outstanding, created, updated)
    if price_per_1000_calls is not None:  # no price, no cost: absent rather than 0
        price.add_metric([], price_per_1000_calls)
        yield from (price, cost)


def _account_families(accounts: tuple[AccountSnapshot, ...]) -> Iterator[Metric]:
    stopped = GaugeMetricFamily(
        "carnumber_fleet_stopped",
        "1 while a fatal API code stops the account's fleet (code label), else 0",
        labels=["account", "code"],
    )
    stopped_at = GaugeMetricFamily(
        "carnumber_fleet_stopped_timestamp_seconds", "When the fleet was stopped", labels=["account"]
    )
    circuit = GaugeMetricFamily(
        "carnumber_circuit_state", "1 for the circuit breaker's current state", labels=["account", "state"]
    )
    window_calls = GaugeMetricFamily(
        "carnumber_circuit_window_calls", "Outcomes in the breaker's window", labels=["account"]
    )
    window_failures = GaugeMetricFamily(
        "carnumber_circuit_window_failures", "Failures in the breaker's window", labels=["account"]
    )
    opens = CounterMetricFamily(
        "carnumber_circuit_opens", "Times the circuit opened (since its key was created)", labels=["account"]
    )
    q_labels = ["account", "window"]
    q_limit = GaugeMetricFamily("carnumber_quota_limit", "Calls allowed in the quota window", labels=q_labels)
    q_used = GaugeMetricFamily("carnumber_quota_used", "Calls counted in the current window", labels=q_labels)
    q_left = GaugeMetricFamily(
        "carnumber_quota_remaining", "Calls left in the current window", labels=q_labels
    )
    q_resets = GaugeMetricFamily(
        "carnumber_quota_resets_timestamp_seconds", "When the current window resets", labels=q_labels
    )
    qps = GaugeMetricFamily(
        "carnumber_rate_limit_qps", "Configured global calls per second", labels=["account"]
    )
    factor = GaugeMetricFamily(
        "carnumber_rate_limit_factor",
        "Adaptive factor in force after throttling answers (1 = full rate)",
        labels=["account"],
    )
    ahead = GaugeMetricFamily(
        "carnumber_rate_limit_booked_ahead_seconds",
        "How far ahead of now the next free slot lies",
        labels=["account"],
    )
    calls = CounterMetricFamily(
        "carnumber_api_calls", "API calls by outcome code (ok = answered)", labels=["account", "code"]
    )
    latency = HistogramMetricFamily(
        "carnumber_api_call_latency_seconds", "API call latency", labels=["account"]
    )
    for a in accounts:
        code = a.stop.get("code", "") if a.stop else ""
        stopped.add_metric([a.account, code], 1.0 if a.stop else 0.0)
        if a.stop and a.stop.get("at"):
            stopped_at.add_metric([a.account], float(a.stop["at"]))
        current = a.circuit.get("state", "closed")
        for s in CIRCUIT_STATES if current in CIRCUIT_STATES else (*CIRCUIT_STATES, current):
            circuit.add_metric([a.account, s], 1.0 if s == current else 0.0)
        window_calls.add_metric([a.account], a.circuit.get("calls", 0))
        window_failures.add_metric([a.account], a.circuit.get("failures", 0))
        opens.add_metric([a.account], a.circuit.get("opens", 0))
        if a.quota_limit is not None and a.quota_used is not None:
            labels = [a.account, a.quota_window]
            q_limit.add_metric(labels, a.quota_limit)
            q_used.add_metric(labels, a.quota_used)
            q_left.add_metric(labels, max(0, a.quota_limit - a.quota_used))
            if a.quota_resets_at_s is not None:
                q_resets.add_metric(labels, a.quota_resets_at_s)
        qps.add_metric([a.account], a.rate_qps)
        if a.rate_factor is not None:
            factor.add_metric([a.account], a.rate_factor)
            ahead.add_metric([a.account], a.rate_booked_ahead_s or 0.0)
        for c, n in sorted(a.calls.by_code.items()):
            calls.add_metric([a.account, c], n)
        if a.calls.latency_count:
            buckets = [(f"{le:g}", n) for le, n in a.calls.buckets]
            buckets.append(("+Inf", a.calls.latency_count))
            latency.add_metric([a.account], buckets, a.calls.latency_sum_s)
    yield from (stopped, stopped_at, circuit, window_calls, window_failures, opens)
    yield from (q_limit, q_used, q_left, q_resets, qps, factor, ahead, calls, latency)


def families(snap: Snapshot) -> Iterator[Metric]:
    """Every metric family of one snapshot. With Redis down, only ``carnumber_redis_up 0``."""
    up = GaugeMetricFamily("carnumber_redis_up", "1 when the exporter could read Redis")
    up.add_metric([], 1.0 if snap.redis_up else 0.0)
    yield up
    took = GaugeMetricFamily("carnumber_scrape_duration_seconds", "Time spent reading Redis")
    took.add_metric([], snap.duration_s)
    yield took
    if not snap.redis_up:
        return
    depth = GaugeMetricFamily(
        "carnumber_queue_depth", "Chunk messages waiting in the queue", labels=["queue"]
    )
    depth.add_metric([snap.queue], snap.queue_depth)
    yield depth
    unacked = GaugeMetricFamily(
        "carnumber_queue_unacked", "Chunk messages delivered to workers and not yet acknowledged"
    )
    unacked.add_metric([], snap.unacked)
    yield unacked
    yield from _run_families(snap.runs, snap.price_per_1000_calls)
    yield from _account_families(snap.accounts)


class SnapshotCollector(Collector):
    """A collector that takes a fresh snapshot on every scrape."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        yield from families(self._snapshot())
