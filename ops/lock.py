#!/usr/bin/env python3
"""Regenerate ``constraints.txt``, the one lock the README, ``.ci/run`` and the image install with.

    python3 ops/lock.py                        # after pyproject.toml changed: keep every pin
                                               # that still fits, resolve what is new
    python3 ops/lock.py --upgrade-package kombu   # let one package (repeatable) move to its newest
    python3 ops/lock.py --check                # exit 1 when constraints.txt does not install
                                               # pyproject.toml's dependencies as pinned

A fresh virtual environment (CPython 3.11, like the image) gets ``-e '.[all,test]'`` with the
current lock as pip constraints (``-c``; a package no pin names resolves to its newest allowed
release), and ``pip freeze`` of it becomes the new lock, pip-tools style: ``name==version`` lines,
no hashes (pip ignores hashes in constraints files). The packages that changed are printed.
Upgrading everything to the newest releases, with the tests and drills run against them first,
is ``ops/upgrade_check.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
EXTRAS = "all,test"
HEADER = """\
# carnumber's pinned dependencies (a pip constraints file): every package that
# `pip install -e '.[all,test]'` brings, at the version the tests and drills passed with.
#   python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[onnx]'
# Regenerate after pyproject.toml changes: python3 ops/lock.py
# Move to newer releases (tests and drills first): python3 ops/upgrade_check.py
# Resolved on CPython {python} ({platform}).
"""

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def read_pins(path: Path) -> dict[str, str]:
    """``{normalised name: version}`` of a ``name==version`` file (missing file: empty)."""
    pins: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            m = _PIN.match(line.strip())
            if m:
                pins[normalise(m.group(1))] = m.group(2)
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def make_venv(where: Path, python: str | None = None) -> Path:
    """A fresh virtual environment with pip; its python."""
    if python:
        subprocess.run([python, "-m", "venv", str(where)], check=True)
    else:
        venv.EnvBuilder(with_pip=True, clear=True).create(where)
    return where / "bin" / "python"


def install(py: Path, constraints: Path | None, extras: str = EXTRAS, upgrade: tuple[str, ...] = ()) -> None:
    """``pip install -e '.[extras]'`` (with ``-c constraints``), then ``-U`` for ``upgrade``."""
    argv = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if constraints is not None:
        argv += ["-c", str(constraints)]
    subprocess.run([*argv, "-e", f"{ROOT}[{extras}]"], check=True, cwd=ROOT)
    if upgrade:
        subprocess.run([*argv, "-U", *upgrade], check=True, cwd=ROOT)


def freeze(py: Path) -> dict[str, str]:
    out = subprocess.run(
        [str(py), "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    pins = {}
    for line in out.splitlines():
        m = _PIN.match(line.strip())
        if m and normalise(m.group(1)) != "carnumber":
            pins[m.group(1)] = m.group(2)
    return pins


def write_lock(pins: dict[str, str], py: Path, path: Path = LOCK) -> None:
    version, platform = subprocess.run(
        [str(py), "-c", "import platform; print(platform.python_version(), platform.machine())"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    body = "".join(f"{name}=={pins[name]}\n" for name in sorted(pins, key=normalise))
    path.write_text(HEADER.format(python=version, platform=f"Linux {platform}") + body)


def changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """One line per package added, removed or moved between two pin sets."""
    old_n = {normalise(k): v for k, v in old.items()}
    new_n = {normalise(k): v for k, v in new.items()}
    lines = []
    for name in sorted(old_n.keys() | new_n.keys()):
        before, after = old_n.get(name), new_n.get(name)
        if before != after:
            lines.append(f"  {name:34s} {before or '-':>14s} -> {after or '-'}")
    return lines


def _without(path: Path, packages: tuple[str, ...], into: Path) -> Path:
    drop = {normalise(p) for p in packages}
    kept = [line for line in path.read_text().splitlines()
            if not (m := _PIN.match(line.strip())) or normalise(m.group(1)) not in drop]  # fmt: skip
    into.write_text("\n".join(kept) + "\n")
    return into


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upgrade-package", "-P", action="append", default=[], metavar="NAME")
    p.add_argument("--check", action="store_true", help="only check that the lock installs as pinned")
    p.add_argument("--python", help="interpreter for the fresh venv (default: this one)")
    args = p.parse_args(argv)
    if sys.version_info[:2] != (3, 11) and not args.python:
        print(f"lock.py: note: resolving on Python {sys.version.split()[0]}; the image runs 3.11",
              file=sys.stderr)  # fmt: skip
    old = read_pins(LOCK)
    with tempfile.TemporaryDirectory(prefix="carnumber-lock-") as tmp:
        py = make_venv(Path(tmp) / "venv", args.python)
        constraints = None
        if LOCK.exists():
            constraints = _without(LOCK, tuple(args.upgrade_package), Path(tmp) / "c.txt")
        print(f"lock.py: installing -e '.[{EXTRAS}]' into a fresh venv"
              f"{' with the current pins' if constraints else ''} ...", flush=True)  # fmt: skip
        try:
            install(py, constraints)
        except subprocess.CalledProcessError:
            print("lock.py: the current pins do not fit pyproject.toml any more; let the package pip "
                  "names move with --upgrade-package NAME", file=sys.stderr)  # fmt: skip
            return 1
        new = freeze(py)
        moved = changes(old, new)
        if args.check:
            if moved:
                print("lock.py: constraints.txt is out of step with pyproject.toml:\n" + "\n".join(moved))
                return 1
            print(f"lock.py: constraints.txt installs as pinned ({len(new)} packages)")
            return 0
        write_lock(new, py)
    print(f"lock.py: wrote {LOCK.relative_to(ROOT)} ({len(new)} packages)")
    print("\n".join(moved) if moved else "  no package changed")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
