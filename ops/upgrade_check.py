#!/usr/bin/env python3
"""Try the newest releases of every dependency before taking them: an upgrade is a decision.

    python3 ops/upgrade_check.py                 # newest releases within pyproject.toml's bounds
    python3 ops/upgrade_check.py --past-bounds   # also celery, kombu, redis past their upper bounds
    python3 ops/upgrade_check.py --drills        # also the full-size credentials and fault drills
    python3 ops/upgrade_check.py --write-lock    # and, when everything passed, adopt them

In a fresh virtual environment (nothing from constraints.txt): ``pip install -e '.[all,test]'``
at the newest releases pip finds, then it prints what moved against constraints.txt (package,
pinned -> newest), runs the dependency-shape test first (kombu and Celery internals we rely on:
``tests/test_dependency_shapes.py``), then the whole test suite, which includes the short
drills (real worker nodes: kill, Redis restart, rotating credentials), and with ``--drills`` the
full drills too. It ends with one line per step and exits 1 if any failed. ``--write-lock`` then
writes those versions to constraints.txt (only when every step passed): review the diff and
commit it like any change.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops.lock import LOCK, ROOT, changes, freeze, install, make_venv, read_pins, write_lock

BOUNDED = ("celery", "kombu", "redis")  # the upper bounds in pyproject.toml


def _step(name: str, argv: list[str], env: dict[str, str], timeout_s: float) -> tuple[str, bool, float]:
    print(f"\n== {name}: {' '.join(argv)}", flush=True)
    started = time.monotonic()
    try:
        ok = subprocess.run(argv, cwd=ROOT, env=env, timeout=timeout_s, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    return name, ok, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--past-bounds", action="store_true", help=f"also {', '.join(BOUNDED)} past their bounds")
    p.add_argument("--drills", action="store_true", help="also the full-size drills (about 15 minutes)")
    p.add_argument("--write-lock", action="store_true", help="adopt the versions when every step passed")
    p.add_argument("--python", help="interpreter for the fresh venv (default: this one)")
    p.add_argument("--keep", help="build the venv here and keep it (default: a temporary one)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="carnumber-upgrade-") as tmp:
        where = Path(args.keep or Path(tmp) / "venv")
        py = make_venv(where, args.python)
        print(f"upgrade_check: newest releases into {where} ...", flush=True)
        install(py, None, upgrade=BOUNDED if args.past_bounds else ())
        newest = freeze(py)
        moved = changes(read_pins(LOCK), newest)
        print(f"\nwhat moved against {LOCK.name} ({len(moved)} package(s)):")
        print("\n".join(moved) if moved else "  nothing: the lock is the newest")
        env = {**os.environ, "PATH": f"{py.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        pytest = [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        steps = [_step("dependency shapes", [*pytest, "tests/test_dependency_shapes.py"], env, 300)]
        steps.append(_step("test suite and short drills", pytest, env, 3600))
        if args.drills:
            steps.append(_step("credentials drill", [str(py), "ops/drills/credentials.py"], env, 1800))
            steps.append(_step("fault drills", [str(py), "ops/drills/faults.py", "--images", "5000",
                                                "--only", "kill-node", "--only", "redis-restart"],
                               env, 3600))  # fmt: skip
        print("\nupgrade_check:")
        for name, ok, took in steps:
            print(f"  {'PASS' if ok else 'FAIL'}  {name} ({took:.0f} s)")
        passed = all(ok for _, ok, _ in steps)
        if args.write_lock and passed:
            write_lock(newest, py)
            print(f"wrote {LOCK.name}: review `git diff {LOCK.name}` and commit it")
        elif args.write_lock:
            print(f"{LOCK.name} left as it is: a step failed")
        return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
