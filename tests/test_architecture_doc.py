"""docs/architecture.md names only files that exist, and names every module of convert/, verify/ and publish/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
# a backticked repository path: `convert/x.py`, `tests/conftest.py`, `fixtures/build.py`, ...
PATH = re.compile(r"`((?:convert|verify|publish|fixtures|bench|tests|docs)/[A-Za-z0-9_./-]+)`")


def _named() -> set[str]:
    return set(PATH.findall(DOC.read_text()))


def test_every_path_named_in_the_architecture_doc_exists():
    named = _named()
    assert len(named) > 20, sorted(named)
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_every_convert_and_verify_module_is_in_the_architecture_doc():
    named = _named()
    modules = sorted(
        p.relative_to(ROOT).as_posix()
        for package in ("convert", "verify", "publish")
        for p in (ROOT / package).rglob("*.py")
    )
    assert modules
    unnamed = [m for m in modules if m not in named]
    assert not unnamed, f"modules missing from docs/architecture.md: {unnamed}"
