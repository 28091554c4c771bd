"""The documentation: README.md is the short front page, the topic pages in docs/ build as a static
site with MkDocs.

- `python -m mkdocs build --strict` succeeds (mkdocs.yml's validation makes a broken link or
  anchor between pages, an absolute link and a page missing from `nav` warnings, and strict mode
  fails on any warning), and writes index.html and every `nav` page;
- README.md stays at most 200 lines and keeps the exact test command that `.ci/run` and CI run;
- every relative link in README.md into docs/ names a file that exists.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TEST_COMMAND = ".venv/bin/python -m pytest -q tests"
README_MAX_LINES = 200
# A Markdown link or image: [text](target) or ![alt](target); the target up to a space or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def nav_pages() -> list[str]:
    """The Markdown files mkdocs.yml's `nav` lists (`- Title: page.md` lines), in order."""
    text = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text.split("\nnav:", 1)[1]
    pages = []
    for line in nav.splitlines()[1:]:
        if line and not line.startswith((" ", "-")):
            break  # the next top-level key
        m = re.match(r"\s*-\s*(?:[^:]+:\s*)?(\S+\.md)\s*$", line)
        if m:
            pages.append(m.group(1))
    return pages


@pytest.mark.e2e  # it starts a process (see tests/conftest.py: e2e = stores, servers, subprocesses)
def test_mkdocs_builds_strict(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr}\n{proc.stdout}"
    assert "WARNING" not in proc.stderr, proc.stderr
    assert (site / "index.html").is_file()
    pages = nav_pages()
    assert "index.md" in pages and len(pages) > 1, pages
    on_disk = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert sorted(pages) == on_disk, "every page in docs/ is in mkdocs.yml's nav, and only those"
    for page in pages:
        html = site / ("index.html" if page == "index.md" else Path(page).with_suffix("") / "index.html")
        assert html.is_file(), f"{page} was not built: {html} missing"


def test_readme_is_short_and_keeps_the_test_command():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    assert TEST_COMMAND in lines, f"README.md lost the exact line {TEST_COMMAND!r} (.ci/run and CI run it)"


def test_readme_links_into_docs_exist():
    targets = LINK.findall(README.read_text(encoding="utf-8"))
    docs_links = [t for t in targets if t.split("#", 1)[0].startswith("docs/")]
    assert docs_links, "README.md links to no docs page"
    for target in docs_links:
        path = target.split("#", 1)[0]
        assert (REPO / path).is_file(), f"README.md links to {target}, but {path} does not exist"
    # Every relative link in README.md is either into docs/ or an anchor; files elsewhere in the
    # repository are named as code spans (MkDocs and the site cannot resolve them).
    relative = [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    assert set(relative) == set(docs_links), f"relative links outside docs/: {sorted(set(relative) - set(docs_links))}"
