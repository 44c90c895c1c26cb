"""Packaging metadata checks that need no build (the full check is `make package-test`).

Every file the package reads at run time must be in the wheel, and setuptools only ships non-Python
files that `[tool.setuptools.package-data]` names: a template or prompt added without a pattern works
in an editable checkout and breaks once installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _package_dirs() -> list[Path]:
    return sorted(p.parent for p in (SRC / "neftune").rglob("*.py") if "__pycache__" not in p.parts)


def _data_files() -> set[Path]:
    return {
        p
        for p in (SRC / "neftune").rglob("*")
        if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts
    }


def _matches(package_data: dict[str, list[str]]) -> dict[tuple[str, str], set[Path]]:
    """Files each (package, pattern) pair of package-data matches, as setuptools globs them."""
    out: dict[tuple[str, str], set[Path]] = {}
    for package, patterns in package_data.items():
        bases = sorted(set(_package_dirs())) if package == "*" else [SRC.joinpath(*package.split("."))]
        for pattern in patterns:
            out[(package, pattern)] = {p for base in bases for p in base.glob(pattern) if p.is_file()}
    return out


def test_every_data_file_under_the_package_is_package_data():
    covered = set().union(*_matches(_pyproject()["tool"]["setuptools"]["package-data"]).values())
    missing = sorted(str(p.relative_to(SRC)) for p in _data_files() - covered)
    assert not missing, f"add these to [tool.setuptools.package-data] in pyproject.toml: {missing}"


def test_every_package_data_pattern_matches_a_file():
    unused = [
        f"{pkg}: {pattern}"
        for (pkg, pattern), files in _matches(_pyproject()["tool"]["setuptools"]["package-data"]).items()
        if not files
    ]
    assert not unused, f"package-data patterns that match nothing (stale): {unused}"


def test_the_check_sees_a_missing_pattern():
    # The helper really globs: dropping the templates' pattern leaves the template uncovered.
    package_data = {"neftune": ["py.typed"]}
    covered = set().union(*_matches(package_data).values())
    assert SRC / "neftune" / "py.typed" in covered
    templates = [p for p in _data_files() if p.suffix != ".typed"]
    assert templates, "expected data files besides py.typed (templates, prompts)"
    assert not covered & set(templates)


def test_strict_mypy_modules_exist():
    overrides = _pyproject()["tool"]["mypy"]["overrides"]
    strict = [m for o in overrides if o.get("disallow_untyped_defs") for m in o["module"]]
    assert "neftune.noise" in strict
    for module in strict:
        path = SRC.joinpath(*module.removesuffix(".*").split("."))
        assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), module
