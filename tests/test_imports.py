"""Every module of the package imports on its own, in a process that has imported no neftune module
before it: no import cycle, no import that works only after another module was loaded.

Each module is imported in a child forked from one fresh interpreter that has loaded only the
third-party packages neftune builds on (torch, transformers, ...) and no module of the package under
test, so every child starts with the package unimported, and whatever one import does (patching
transformers, registering a finder) stays in its own process.  The fork keeps the test fast: a
cold interpreter per module would spend most of its time importing torch and transformers again.
Only import-time failures count.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Third-party packages loaded once, before any fork (the slow part of importing most modules).
PRELOAD = (
    "numpy",
    "torch",
    "transformers",
    "transformers.trainer",
    "peft",
    "datasets",
    "scipy.stats",
    "matplotlib.pyplot",
    "jinja2",
    "yaml",
)

DRIVER = textwrap.dedent(
    """
    import importlib, json, os, sys, traceback

    root, preload, modules, workers = json.loads(sys.argv[1])
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    loaded = [m for m in sys.modules if m == root or m.startswith(root + ".")]
    assert not loaded, f"a preloaded package imported {loaded}"

    failures, running = {}, {}

    def reap():
        pid, status = os.wait()
        name, read_end = running.pop(pid)
        with os.fdopen(read_end) as pipe:
            message = pipe.read()
        if status != 0:
            failures[name] = message or f"exit status {status}"

    for name in modules:
        while len(running) >= workers:
            reap()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: import one module, report, leave without running exit handlers
            os.close(read_end)
            code = 0
            try:
                importlib.import_module(name)
            except BaseException:
                os.write(write_end, traceback.format_exc().encode())
                code = 1
            os._exit(code)
        os.close(write_end)
        running[pid] = (name, read_end)
    while running:
        reap()
    print(json.dumps(failures))
    """
)


def package_modules(root: Path, package: str) -> list[str]:
    """Every module under ``root/package`` as a dotted name (packages by their ``__init__``)."""
    names = []
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def import_each(root: Path, package: str, preload: tuple[str, ...] = PRELOAD) -> dict[str, str]:
    """Import every module of ``package`` (found under ``root``) alone; return ``{module: traceback}``
    for those that failed."""
    modules = package_modules(root, package)
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }
    workers = max(2, os.cpu_count() or 2)
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps([package, list(preload), modules, workers])],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the driver forks one child per module")
def test_every_module_imports_alone():
    modules = package_modules(SRC, "neftune")
    assert len(modules) > 40 and "neftune.data.types" in modules and "neftune.cli" in modules
    failures = import_each(SRC, "neftune")
    assert not failures, "\n\n".join(f"{name}:\n{trace}" for name, trace in failures.items())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the driver forks one child per module")
def test_an_import_cycle_is_caught(tmp_path):
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic.b import B\n\nA = 1\n")
    (package / "b.py").write_text("from cyclic.a import A\n\nB = 2\n")
    (package / "c.py").write_text("C = 3\n")
    failures = import_each(tmp_path, "cyclic", preload=())
    assert sorted(failures) == ["cyclic.a", "cyclic.b"]
    assert all("partially initialized module" in trace for trace in failures.values())


def test_the_readme_code_map_names_every_module():
    readme = (SRC.parent / "README.md").read_text(encoding="utf-8")
    code_map = readme.split("## Where the code is", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"([\w/]+\.py)\b", code_map))
    missing = [
        str(path.relative_to(SRC / "neftune"))
        for path in sorted((SRC / "neftune").rglob("*.py"))
        if path.name != "__init__.py" and path.name not in {Path(name).name for name in listed}
    ]
    assert not missing, f"README's 'Where the code is' lacks {missing}"
