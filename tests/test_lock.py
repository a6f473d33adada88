"""One lock, used everywhere: constraints.txt pins every dependency pyproject.toml names, within
its bounds, and the README's install commands, .ci/run, the image and the wheelhouse all install
through it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and ";" not in line, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = version
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra if not r.startswith("carnumber")]
    return reqs


def test_every_dependency_is_pinned_within_its_bounds() -> None:
    pins = _pins()
    for req in _requirements():
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in constraints.txt: python3 ops/lock.py"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {req.specifier}"
        )


def test_the_libraries_whose_internals_we_use_have_upper_bounds() -> None:
    bounded = {canonicalize_name(r.name): r.specifier for r in _requirements()}
    for name in ("celery", "kombu", "redis"):
        assert any(s.operator in ("<", "<=", "~=", "==") for s in bounded[name]), name


def test_readme_ci_image_and_wheelhouse_install_through_the_lock() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block is not None
    commands = [line for line in block.group(1).splitlines() if line and not line.startswith("#")]
    assert commands[0] == (
        "python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[onnx]' "
        "&& .venv/bin/carnumber demo"
    )
    assert commands[1] == (
        "python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[test]' "
        "&& .venv/bin/python -m pytest -q"
    )
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, ".ci/run runs exactly the README's test command"
    assert "-c constraints.txt" in (ROOT / "ops" / "Dockerfile").read_text()
    assert "-c constraints.txt" in (ROOT / "ops" / "images" / "wheelhouse.sh").read_text()
    assert "!constraints.txt" in (ROOT / ".dockerignore").read_text().splitlines()
