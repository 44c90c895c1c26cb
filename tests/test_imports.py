"""Every module of the package imports on its own, in a process that has imported no neftune module
before it: no import cycle, no import that works only after another module was loaded.  And no
cycle hides in an import inside a function, which no import at start-up would show.

Each module is imported in a child forked from one fresh interpreter that has loaded only the
third-party packages neftune builds on (torch, transformers, ...) and no module of the package under
test, so every child starts with the package unimported, and whatever one import does (patching
transformers, registering a finder) stays in its own process.  The fork keeps the test fast: a
cold interpreter per module would spend most of its time importing torch and transformers again.
Only import-time failures count.

The static check (:func:`import_graph`, :func:`find_cycles`) reads every module with :mod:`ast` and
follows every ``import`` and ``from ... import`` statement at any depth (in functions, methods,
``try`` blocks), resolving relative imports and ``from pkg import name`` where ``name`` is a
submodule.  Two modules that import each other that way are a cycle even when one side imports
only inside a function: it works today because of the order things happen to be called in.
Conventions:

* Imports under ``if TYPE_CHECKING:`` are ignored: they never run.  So are modules named by a
  string (``importlib.import_module``, a preset's ``"module:function"`` loader): that late binding
  is how the registries avoid import edges on purpose.
* Importing ``pkg.mod`` first runs ``pkg/__init__``, so it is also an edge to ``pkg`` unless the
  importer lies inside ``pkg`` (then ``pkg`` is already being imported when the importer runs).
  Hence a package's ``__init__`` importing its own submodules is no cycle, nor is a submodule
  importing a sibling (``from pkg.other import x``); but a submodule importing the names that
  ``pkg/__init__`` defines (``from pkg import name``, ``import pkg``) is an edge back to ``pkg``, a
  cycle when that ``__init__`` imports the submodule.
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
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


# -- the static import graph: cycles through imports at any depth ----------------------------------


def module_files(root: Path, package: str) -> dict[str, Path]:
    """``{dotted name: file}`` of every module under ``root/package`` (packages by their ``__init__``)."""
    return dict(zip(package_modules(root, package), _module_paths(root, package), strict=True))


def _module_paths(root: Path, package: str) -> list[Path]:
    return sorted((root / package).rglob("*.py"))


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_statements(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree`` at any depth, except in the body of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _imported(statement: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``statement`` (in module ``importer``) names directly."""
    if isinstance(statement, ast.Import):
        named = [alias.name for alias in statement.names]
    else:
        base = statement.module or ""
        if statement.level:
            anchor = importer if is_package else importer.rpartition(".")[0]
            for _ in range(statement.level - 1):
                anchor = anchor.rpartition(".")[0]
            base = f"{anchor}.{base}" if base else anchor
        named = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in statement.names]
    targets = set()
    for name in named:
        while name and name not in modules:  # ``import pkg.mod.Class`` is not valid, but be lenient
            name = name.rpartition(".")[0]
        if name:
            targets.add(name)
    return targets


def _run_by_importing(target: str, importer: str) -> set[str]:
    """``target`` and the packages above it that importing it runs: those the importer is not inside."""
    parts = target.split(".")
    above = {".".join(parts[:n]) for n in range(1, len(parts))}
    return {target} - {importer} | {name for name in above if importer != name and not importer.startswith(name + ".")}


def import_graph(root: Path, package: str) -> dict[str, dict[str, int]]:
    """``{module: {module it imports: line of the first such import}}`` within ``package``, read with
    :mod:`ast` (see the module docstring for what counts)."""
    files = module_files(root, package)
    modules = set(files)
    graph: dict[str, dict[str, int]] = {}
    for name, path in files.items():
        edges = graph.setdefault(name, {})
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for statement in _import_statements(tree):
            for target in _imported(statement, name, path.name == "__init__.py", modules):
                for run in _run_by_importing(target, name):
                    if run in modules and (run not in edges or statement.lineno < edges[run]):
                        edges[run] = statement.lineno
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The groups of more than one module that all reach each other (each a cycle or several), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(groups)


def shortest_cycle(graph: dict[str, dict[str, int]], group: list[str]) -> list[str]:
    """A shortest cycle through the first module of ``group`` within it, that module repeated at the end."""
    start, members = group[0], set(group)
    previous: dict[str, str] = {}
    frontier = [start]
    while start not in previous:  # breadth first, back to start
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt in members and nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    path = [start]
    node = previous[start]
    while node != start:
        path.append(node)
        node = previous[node]
    return [start, *reversed(path[1:]), start]


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest cycle per :func:`strongly_connected` group."""
    return [shortest_cycle(graph, group) for group in strongly_connected(graph)]


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    """``a (line 3) -> b (line 40) -> a``: each module with the line of its import of the next."""
    steps = [f"{name} (line {graph[name][nxt]})" for name, nxt in itertools.pairwise(cycle)]
    return " -> ".join([*steps, cycle[-1]])


#: Cycles through imports inside functions that were there when this check came, each for its own
#: change to break.  Any other cycle fails the check, and so does an entry here once its cycle is
#: gone (or has grown), so the list only shrinks.
KNOWN_CYCLES = {
    # the checkpoint writer explains a failed save with the last complete checkpoint, which
    # neftune.resources finds through neftune.checkpoints
    frozenset({"neftune.checkpoints", "neftune.resources"}),
    # train hands --method dpo to neftune.preference, which builds its model and trainer with train's helpers
    frozenset({"neftune.preference", "neftune.train"}),
}


def test_no_import_cycle_even_through_imports_inside_functions():
    graph = import_graph(SRC, "neftune")
    assert "neftune.data.formats" in graph["neftune.data.evalsets"]
    groups = strongly_connected(graph)
    new = [describe_cycle(shortest_cycle(graph, g), graph) for g in groups if frozenset(g) not in KNOWN_CYCLES]
    assert not new, "import cycles:\n" + "\n".join(new)
    gone = KNOWN_CYCLES - {frozenset(g) for g in groups}
    assert not gone, f"no longer a cycle (as listed), remove it from KNOWN_CYCLES: {[sorted(g) for g in gone]}"


def test_the_static_check_finds_cycles_through_functions_and_package_names(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    files = {
        # a package importing its own submodules, which import each other's names: no cycle
        "__init__.py": "from pkg.a import A\nfrom . import b\n",
        "a.py": "from pkg.b import B\n\nA = 1\n",
        "b.py": "B = 2\n",
        # a cycle closed by an import inside a function, through a relative import
        "c.py": "from .d import D\n\nC = 3\n",
        "d.py": "D = 4\n\n\ndef late():\n    from pkg import c\n    return c.C\n",
        # one closed only under TYPE_CHECKING: ignored
        "e.py": "from typing import TYPE_CHECKING\nfrom pkg.f import F\nif TYPE_CHECKING:\n    from pkg.c import C\n",
        "f.py": "import typing\nF = 6\nif typing.TYPE_CHECKING:\n    from pkg.e import E\n",
        # a submodule taking a name its package's __init__ defines, while that __init__ imports it
        "sub/__init__.py": "from pkg.sub.g import G\n\nNAME = 7\n",
        "sub/g.py": "G = 8\n\n\ndef name():\n    from pkg.sub import NAME\n    return NAME\n",
        # importing pkg.sub.g from outside runs pkg.sub's __init__: an edge to it
        "h.py": "import pkg.sub.g\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert set(graph["pkg"]) == {"pkg.a", "pkg.b"} and set(graph["pkg.a"]) == {"pkg.b"}
    assert set(graph["pkg.h"]) == {"pkg.sub", "pkg.sub.g"} and set(graph["pkg.f"]) == set()
    cycles = find_cycles(graph)
    assert cycles == [["pkg.c", "pkg.d", "pkg.c"], ["pkg.sub", "pkg.sub.g", "pkg.sub"]]
    assert describe_cycle(cycles[0], graph) == "pkg.c (line 1) -> pkg.d (line 5) -> pkg.c"
