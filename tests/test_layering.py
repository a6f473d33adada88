"""Imports point one way: producers → workers; workers never import producers, the server or
the CLI; the low-level modules import nothing of ours but the error tree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("workers", "producers", "ocrserver", "carnumber")
FORBIDDEN = {
    "workers": ("producers", "ocrserver", "carnumber"),
    "producers": ("ocrserver", "carnumber"),
    "ocrserver": ("producers", "carnumber"),
}
LOW_LEVEL = {
    "workers/errors.py": (),
    "workers/message.py": (),
    "workers/keys.py": (),
    "workers/config.py": ("workers.errors",),
    "workers/redis_connect.py": ("workers.errors",),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] in OURS}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_downwards(package: str) -> None:
    bad = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in (ROOT / package).rglob("*.py")
        for name in _imports(path)
        if name.split(".")[0] in FORBIDDEN[package]
    }
    assert not bad


@pytest.mark.parametrize(("module", "allowed"), sorted(LOW_LEVEL.items()))
def test_low_level_modules_import_nothing_of_ours(module: str, allowed: tuple[str, ...]) -> None:
    assert _imports(ROOT / module) <= set(allowed)
