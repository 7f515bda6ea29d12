"""README.md and docs/*.md name only files that exist: relative links, repository paths in
backticks, and anchors within the same page."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: backticked paths starting with these are repository paths (run-directory paths start with runs/)
REPO_DIRS = ("pipeline/", "annotators/", "evaluation/", "toyfaces/", "bench/", "tests/", "docs/", ".ci/")
REPO_FILE = re.compile(r"[\w.-]+\.(ya?ml|toml|txt|py|md)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_references(page: Path) -> list[str]:
    text = page.read_text()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    bad = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target) and not (page.parent / target).exists():
            bad.append(f"link {target}")
    for path in re.findall(r"`([^`\s]+)`", prose):
        path = path.rstrip(",.;:")
        if (path.startswith(REPO_DIRS) or REPO_FILE.fullmatch(path)) and not re.search(r"[<*]", path) \
                and not (ROOT / path).exists():
            bad.append(f"path `{path}`")
    anchors = {anchor(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}
    bad += [f"anchor #{a}" for a in re.findall(r"\]\(#([^)]+)\)", text) if a not in anchors]
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_only_existing_files(page):
    assert broken_references(page) == []


def test_the_check_finds_a_missing_file(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee [a](missing.md), `pipeline/nowhere.py`, [b](#title) and [c](#nothing).\n")
    assert broken_references(page) == ["link missing.md", "path `pipeline/nowhere.py`", "anchor #nothing"]
