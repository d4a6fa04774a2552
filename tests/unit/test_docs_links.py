"""Every relative link in README.md and docs/*.md points at a file that exists and, for #anchors,
at a heading of that file (GitHub's slugs); every page of docs/ is reachable from its index."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 200  # the README is the front door; the detail lives in docs/

INLINE_LINK_RE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK_RE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$")
HEADING_RE = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE_RE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
SCHEME_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE_RE.match(line)
        if match:
            marker = match.group(1)
            if fence is None:
                fence = marker[0] * 3
            elif marker.startswith(fence):
                fence = None
            continue
        if fence is None:
            yield number, line


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text without markup, lower case, punctuation
    dropped (letters, digits, _, - and spaces stay), spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, line in _prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING_RE.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def links(page: Path):
    """(line number, target) of every link in the page's prose (not in code)."""
    for number, line in _prose_lines(page.read_text(encoding="utf-8")):
        prose = re.sub(r"(`+).*?\1", "", line)  # code spans are not links
        for match in INLINE_LINK_RE.finditer(prose):
            yield number, match.group(1)
        match = REFERENCE_LINK_RE.match(prose)
        if match:
            yield number, match.group(1)


def broken_links(page: Path) -> list[str]:
    problems = []
    for number, target in links(page):
        if SCHEME_RE.match(target) or target.startswith("//"):
            continue  # http(s), mailto: not checked here
        path, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path)).resolve() if path else page
        where = f"{page.relative_to(REPO)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
        elif anchor:
            if dest.suffix != ".md" or dest.is_dir():
                problems.append(f"{where}: an #anchor into a file that is not markdown")
            elif unquote(anchor).lower() not in anchors(dest):
                problems.append(f"{where}: {dest.name} has no heading #{anchor}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_every_docs_page_is_in_the_index():
    index = DOCS / "README.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for _, t in links(index)
              if not SCHEME_RE.match(t) and t.partition("#")[0]}
    unlisted = [p.name for p in DOCS.glob("*.md") if p != index and p.resolve() not in linked]
    assert unlisted == [], f"docs/README.md does not link to {unlisted}"


def test_readme_stays_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; move detail to a page in docs/ and link to it")


def test_github_slugs():
    assert github_slug('What "blank" means, and what hostagent refuses') == \
        "what-blank-means-and-what-hostagent-refuses"
    assert github_slug("Configuration (`/etc/hostagent/hostagent.toml`)") == \
        "configuration-etchostagenthostagenttoml"
    assert github_slug("ECS and CouchDB: where CouchDB may run") == \
        "ecs-and-couchdb-where-couchdb-may-run"
    assert github_slug("[volume]") == "volume"
    assert github_slug("keep_last — the newest") == "keep_last--the-newest"


def test_a_broken_link_and_a_missing_anchor_are_found(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    (tmp_path / "other.md").write_text("# Other\n## A heading\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-heading) [gone](missing.md) [bad](other.md#nope)\n"
                    "[self](#page) `[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n"
                    "# Page\n[web](https://example.com/x)\n", encoding="utf-8")
    problems = broken_links(page)
    assert len(problems) == 2, problems
    assert "no such file missing.md" in problems[0] and "no heading #nope" in problems[1]
