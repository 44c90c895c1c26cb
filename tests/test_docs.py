"""The documentation: README.md is the introduction and docs/ (built by mkdocs.yml) holds the guides.

Every page in docs/ is in mkdocs.yml's nav and reachable by links from the README, every relative link
in the README and the docs resolves, and links from a docs page stay inside docs/ (mkdocs --strict
refuses the others, and the built site has no copy of the files they point to).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def links(path: Path) -> list[str]:
    """Relative link targets of a Markdown file (code blocks and inline code are not links), anchors cut."""
    text = _CODE.sub("``", _FENCE.sub("", path.read_text(encoding="utf-8")))
    targets = [target.split("#", 1)[0] for target in _LINK.findall(text)]
    return [t for t in targets if t and not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def nav_pages() -> list[str]:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["docs_dir"] == "docs"

    def walk(entries: list[object]) -> list[str]:
        pages: list[str] = []
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            pages += walk(value) if isinstance(value, list) else [str(value)]
        return pages

    return walk(config["nav"])


def docs_pages() -> list[str]:
    return sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists():
    nav = nav_pages()
    assert len(nav) == len(set(nav)), f"pages listed twice in mkdocs.yml's nav: {nav}"
    assert sorted(nav) == docs_pages(), "mkdocs.yml's nav and the pages in docs/ differ"
    assert nav[0] == "index.md"


def test_every_readme_guides_link_resolves_to_a_docs_page():
    readme = README.read_text(encoding="utf-8")
    assert "\n## Guides\n" in readme
    guides = readme.split("\n## Guides\n", 1)[1].split("\n## ", 1)[0]
    listed = [t.split("#", 1)[0] for t in _LINK.findall(guides)]
    assert len(listed) >= 10, listed
    for target in listed:
        assert (ROOT / target).is_file(), f"README's Guides links to {target}, which does not exist"
        assert (ROOT / target).resolve().is_relative_to(DOCS), f"{target} is not a docs page"


def test_every_relative_link_resolves():
    broken = [
        f"{path.relative_to(ROOT)} -> {target}"
        for path in [README, ROOT / "CONTRIBUTING.md", *sorted(DOCS.rglob("*.md"))]
        for target in links(path)
        if not (path.parent / target).exists()
    ]
    assert not broken, f"broken links: {broken}"


def test_docs_pages_link_only_inside_docs():
    outside = [
        f"{path.relative_to(ROOT)} -> {target}"
        for path in sorted(DOCS.rglob("*.md"))
        for target in links(path)
        if not (path.parent / target).resolve().is_relative_to(DOCS)
    ]
    assert not outside, f"links out of docs/ (write the path in backticks instead): {outside}"


def test_every_docs_page_is_reachable_from_the_readme():
    seen: set[Path] = set()
    todo = [README.resolve()]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        todo += [
            (page.parent / target).resolve()
            for target in links(page)
            if target.endswith(".md") and (page.parent / target).is_file()
        ]
    unreachable = [p for p in docs_pages() if (DOCS / p).resolve() not in seen]
    assert not unreachable, f"docs pages no link from README.md leads to: {unreachable}"


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is in the dev extra; `make docs` installs it")
    site = tmp_path / "site"
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert (site / "index.html").is_file() and (site / "serving" / "index.html").is_file()
