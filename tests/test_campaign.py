"""The seeded fault campaign (``ops/drills/campaign.py``): its generator and checker as pure
functions, and short schedules played against a real fleet (its own AOF Redis, the local server,
real ``carnumber worker`` nodes, the real ``carnumber enqueue`` and operator commands).

A seed the campaign found failing goes into :data:`REGRESSION_SEEDS` (at the small size) with the
finding it reproduces; each is played as its own test.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from ops.drills import campaign
from ops.drills.campaign_check import IN_FLIGHT_S, check, exactly_one
from ops.drills.campaign_gen import EVENT_KINDS, FAULTS, FULL, SMALL, Event, Params, Schedule, generate

# seed -> what it found (at SMALL); played by test_regression_seed. Those the product still
# fails are expected to fail (not strictly: the timing may miss the window) until their fix lands;
# the findings are in the notes (campaign-findings.md) and the issue.
REGRESSION_SEEDS: dict[int, str] = {
    5: "F2 (issue 19 #2): verify --republish on a live run paid 32 pictures twice",
    11: "F2 (issue 19 #2): two verify --republish on a live run paid 158 twice, the run done early",
}
STILL_FAILING: set[int] = set()
# Short schedules of the default suite: together they play a node SIGKILLed and SIGTERMed, a
# Redis restart, the producer killed and run again, pause/resume, cancel/resume --force.
SMOKE_SEEDS = (1,)


# -- the generator ---------------------------------------------------------------------------------
def test_a_seed_gives_the_same_schedule_every_time() -> None:
    for seed in range(20):
        assert generate(seed, FULL) == generate(seed, FULL)
        assert Schedule.from_json(json.loads(json.dumps(generate(seed, FULL).to_json()))) == generate(
            seed, FULL
        )
    assert len({generate(s, FULL).to_json().__repr__() for s in range(20)}) == 20


def test_schedules_cover_every_kind_of_event_within_the_run() -> None:
    seen: set[str] = set()
    root = Params(root=True)
    for seed in range(60):
        s = generate(seed, root)
        seen.update(e.kind for e in s.events)
        assert SMALL.events_min <= len(s.events) <= root.events_max
        assert all(0 <= e.at_s <= 1.05 * root.horizon_s() + root.horizon_s() for e in s.events)
        assert root.nodes_min <= s.nodes <= root.nodes_max
        for kind in ("redis-past", "second-source", "quota-raise"):
            assert sum(e.kind == kind for e in s.events) <= 1
        if any(e.kind == "quota-raise" for e in s.events):
            assert s.quota is not None and 0 < s.quota <= 0.6 * root.images
        if any(e.kind == "cut" for e in s.events):
            assert s.ns_nodes == 1
    assert seen == set(EVENT_KINDS)


def test_redis_events_never_overlap_and_outages_have_their_lengths() -> None:
    for seed in range(200):
        s = generate(seed, FULL)
        redis = [e for e in s.events if e.kind.startswith("redis-")]
        for a, b in pairwise(redis):
            assert b.at_s >= a.at_s + float(a.args["down_s"])
        for e in redis:
            down = float(e.args["down_s"])
            lo, hi = {"redis-blip": FULL.blip_s, "redis-long": FULL.long_s}.get(
                e.kind, (FULL.redis_outage_s + FULL.past_s[0], FULL.redis_outage_s + FULL.past_s[1])
            )
            assert lo <= down <= hi, e
        for e in s.events:
            if e.kind in ("stop", "cut"):
                assert float(e.args["for_s"]) > FULL.lease_s  # longer than a lease


def test_without_root_a_cut_becomes_a_stop_and_nothing_else_changes() -> None:
    for seed in range(40):
        with_root, without = generate(seed, Params(root=True)), generate(seed, Params(root=False))
        assert [e.kind if e.kind != "cut" else "stop" for e in with_root.events] == [
            e.kind for e in without.events
        ]
        assert [e.at_s for e in with_root.events] == [e.at_s for e in without.events]


def test_the_replay_command_names_the_sizes_that_differ() -> None:
    assert campaign.replay_command(7, Params()) == "python ops/drills/campaign.py --seed 7 --no-root"
    small = Params(**{**SMALL.to_json(), "root": True, "qps": 10.0})
    assert campaign.replay_command(7, small) == "python ops/drills/campaign.py --seed 7 --size small --qps 10"
    args = campaign._parser().parse_args(["--seed", "7", "--size", "small", "--qps", "10"])
    assert campaign.params_of(args).qps == 10.0 and campaign.params_of(args).images == SMALL.images


# -- the checker -----------------------------------------------------------------------------------
def _history(**over: Any) -> dict[str, Any]:
    """A clean history of 3 images (one a copy of another), 2 pictures, 2 calls."""
    t0 = 1000.0
    h: dict[str, Any] = {
        "schedule": Schedule("seed 0", 0, SMALL, nodes=2, events=(Event(5.0, "kill", {}),)).to_json(),
        "t0": t0, "errors": [], "finish_s": 3.0, "total_s": 20.0,
        "ops": [{"kind": "enqueue", "what": "carnumber enqueue", "start": t0, "end": t0 + 2, "rc": 0,
                 "bound": 0}],
        "listing": [{"source": "a", "images": {"i1": "p1", "i2": "p2"}},
                    {"source": "b", "images": {"c1": "p1"}}],
        "outcomes": {"i1": [["ok", 0], ["ok", 1]], "i2": [["no_plate", None]], "c1": [["ok", 0], ["ok", 1]]},
        "server": {"accepted_total": 2, "pictures": {"p1": [t0 + 3], "p2": [t0 + 4]}},
        "verify": {"rc": 0, "json": {"ok": True}}, "report": {"rc": 0, "calls": 2},
        "status": {"rc": 0, "calls": "2", "state": "done"},
        "nodes": [{"name": "node1", "alive": True, "signals": [], "rc": None}],
    }  # fmt: skip
    h.update(over)
    return h


def _invariants(h: dict[str, Any]) -> list[str]:
    return [v.invariant for v in check(h)[1]]


def test_a_clean_history_passes_and_gives_its_figures() -> None:
    figures, violations = check(_history())
    assert violations == []
    assert (figures.images, figures.pictures, figures.calls, figures.extra_calls) == (3, 2, 2, 0)
    assert figures.verify_agrees and figures.events == {"kill": 1}


def test_one_outcome_per_image() -> None:
    assert exactly_one([["ok", 0], ["ok", 1]]) and exactly_one([["failed", None]])
    assert not exactly_one([["ok", 0], ["ok", 0]])
    assert not exactly_one([["ok", 0], ["failed", None]])
    assert not exactly_one([["no_plate", None], ["no_plate", None]])


def test_a_missing_image_that_verify_calls_ok_is_two_violations() -> None:
    h = _history(outcomes={"i1": [["ok", 0]], "c1": [["ok", 0]]})
    assert _invariants(h) == ["outcomes", "verify"]
    h["verify"] = {"rc": 1, "json": {"ok": False}}
    assert _invariants(h) == ["outcomes"]  # verify agrees; the image is still lost


def test_a_picture_paid_twice_needs_a_fault_while_its_first_call_was_in_flight() -> None:
    t0 = 1000.0
    twice = {"accepted_total": 3, "pictures": {"p1": [t0 + 3, t0 + 30], "p2": [t0 + 4]}}
    counted = {"report": {"rc": 0, "calls": 3}, "status": {"rc": 0, "calls": 3, "state": "done"}}
    assert _invariants(_history(server=twice, **counted)) == ["calls", "paid-twice"]
    kill = {"kind": "kill", "what": "SIGKILL node1", "start": t0 + 3.5, "end": t0 + 3.6, "rc": 0, "bound": 8}
    assert _invariants(_history(server=twice, ops=[kill], **counted)) == []
    late = dict(kill, start=t0 + 3 + IN_FLIGHT_S + 5, end=t0 + 3 + IN_FLIGHT_S + 5)
    assert _invariants(_history(server=twice, ops=[late], **counted)) == ["paid-twice"]


def test_calls_beyond_the_bound_and_counts_that_disagree() -> None:
    h = _history(report={"rc": 0, "calls": 1}, status={"rc": 0, "calls": 9, "state": "done"})
    assert _invariants(h) == ["report", "status"]
    assert _invariants(_history(report={"rc": 1, "calls": None})) == ["report"]


def test_nodes_alive_or_exited_non_zero_and_none_dies_by_itself() -> None:
    t0 = 1000.0
    nodes = [
        {"name": "node1", "alive": False, "signals": ["SIGTERM"], "rc": 0, "exited": t0 + 5},
        {"name": "node2", "alive": False, "signals": ["SIGKILL"], "rc": -9, "exited": t0 + 5},
        {"name": "node3", "alive": False, "signals": [], "rc": 0, "exited": t0 + 5, "tail": "Unrecoverable"},
        {"name": "node4", "alive": False, "signals": [], "rc": 1, "exited": t0 + 50},
    ]
    assert _invariants(_history(nodes=nodes)) == ["nodes", "nodes"]
    past = {"kind": "redis-past", "what": "Redis down", "start": t0 + 10, "end": t0 + 40, "rc": 0, "bound": 8}
    assert _invariants(_history(nodes=nodes[3:], ops=[past])) == []  # past the outage: exits, as documented


def test_anything_killed_for_running_too_long_or_a_run_not_done() -> None:
    hung = {"kind": "pause", "what": "carnumber resume campaign", "start": 1.0, "end": 2.0, "rc": None,
            "bound": 0, "timed_out": True}  # fmt: skip
    assert _invariants(_history(ops=[hung])) == ["bounded"]
    assert _invariants(_history(status={"rc": 0, "calls": 2, "state": "running"})) == ["bounded"]


def test_a_command_that_exits_0_did_what_it_said() -> None:
    t0 = 1000.0
    enqueue = {"kind": "enqueue", "what": "carnumber enqueue a --run campaign", "start": t0, "end": t0 + 2,
               "rc": 0, "bound": 0, "out": "run campaign: 1 images seen, 1 enqueued in 1 chunks"}  # fmt: skip
    assert _invariants(_history(ops=[enqueue])) == ["commands"]  # source a lists 2
    pause = {
        "kind": "pause",
        "what": "carnumber pause campaign",
        "start": t0 + 1,
        "end": t0 + 2,
        "rc": 0,
        "bound": 0,
    }
    resume = {"kind": "pause", "what": "carnumber resume campaign", "start": t0 + 10, "end": t0 + 11, "rc": 0,
              "bound": 0, "note": "state 3 s later: running"}  # fmt: skip
    assert _invariants(_history(ops=[pause, resume])) == ["commands"]  # p1 called at t+3, p2 at t+4
    assert _invariants(_history(ops=[dict(pause, start=t0 + 4.5, end=t0 + 5), resume])) == []
    held = dict(resume, note="state 3 s later: paused")
    assert _invariants(_history(ops=[dict(pause, start=t0 + 4.5, end=t0 + 5), held])) == ["commands"]


def test_the_table_sums_the_schedules() -> None:
    ok = {"name": "seed 1", "seed": 1, "figures": check(_history())[0].to_json(), "violations": []}
    bad_fig = check(_history(outcomes={"i1": [["ok", 0]], "c1": [["ok", 0]]}))[0].to_json()
    bad = {"name": "seed 2", "seed": 2, "figures": bad_fig, "violations": ["outcomes: 1 images missing"]}
    text = campaign.table([ok, bad])
    assert "2 (1 passed, 1 failed)" in text and "failing seeds" in text and text.rstrip().endswith("2")
    assert "verify agreement" in text and "1 of 2" in text


# -- real schedules --------------------------------------------------------------------------------
def _play(schedule: Schedule) -> dict[str, Any]:
    result = campaign.run_schedule(schedule, quiet=True)
    assert not result["violations"], "\n".join(result["violations"]) + f"\nreplay: {result['replay']}"
    return result


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", SMOKE_SEEDS)
def test_a_short_schedule_keeps_every_invariant(seed: int) -> None:
    params = Params(**{**SMALL.to_json(), "root": False})
    result = _play(generate(seed, params))
    f = result["figures"]
    assert f["images"] >= SMALL.images + 5 and f["missing"] == 0 and f["verify_agrees"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "seed",
    [
        pytest.param(s, marks=pytest.mark.xfail(reason=REGRESSION_SEEDS[s], strict=False))
        if s in STILL_FAILING
        else s
        for s in sorted(REGRESSION_SEEDS)
    ],
)
def test_regression_seed(seed: int) -> None:
    _play(generate(seed, Params(**{**SMALL.to_json(), "root": False})))


def test_faults_are_event_kinds() -> None:
    assert set(FAULTS) <= set(EVENT_KINDS)


def test_the_results_of_a_campaign_are_kept_per_seed(tmp_path: Path) -> None:
    result = {"name": "seed 3", "seed": 3, "figures": check(_history())[0].to_json(), "violations": ["x: y"],
              "replay": "r", "history": {"a": 1}}  # fmt: skip
    campaign._save(tmp_path, result)
    assert json.loads((tmp_path / "seed-3.json").read_text())["violations"] == ["x: y"]
    assert json.loads((tmp_path / "history-3.json").read_text()) == {"a": 1}


def test_report_may_lag_by_the_last_second_of_a_killed_process() -> None:
    t0 = 1000.0
    calls = {f"p{i}": [t0 + 3 + i / 10] for i in range(10)}  # 10 calls from t+3.0 to t+3.9
    listing = [{"source": "a", "images": {f"i{i}": f"p{i}" for i in range(10)}}]
    outcomes = {f"i{i}": [["no_plate", None]] for i in range(10)}
    kill = {"kind": "kill", "what": "SIGKILL node1", "start": t0 + 4.0, "end": t0 + 4.0, "rc": 0, "bound": 0}
    h = _history(listing=listing, outcomes=outcomes, ops=[kill],
                 server={"accepted_total": 10, "pictures": calls},
                 report={"rc": 0, "calls": 1}, status={"rc": 0, "calls": 10, "state": "done"})  # fmt: skip
    assert _invariants(h) == []  # 9 lost with the killed process's last second: the documented margin
    assert _invariants(dict(h, ops=[])) == ["report"]
