"""The documentation holds together: a short front page that links every page, links that resolve, each piece of
text in one place, and every environment variable the code reads documented in docs/configuration.md."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, REPO / "deploy" / "README.md", REPO / "tests" / "faults" / "README.md", *sorted(DOCS.glob("*.md"))]
FRONT_PAGE_MAX_LINES = 150


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code (their brackets and parentheses are not links)."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.DOTALL))


def links(page: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text()))


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower().replace("`", "")).replace(" ", "-") for h in headings}


def test_the_front_page_is_short():
    lines = len(README.read_text().splitlines())
    assert lines < FRONT_PAGE_MAX_LINES, f"README.md has {lines} lines: move the depth into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path):
    broken = []
    for link in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(link)
            continue
        if anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(link)
    assert not broken, f"{page.relative_to(REPO)}: links to nothing: {broken}"


def test_the_front_page_links_every_docs_page():
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in links(README)}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_each_sentence_lives_in_one_page():
    """The front page summarizes and links; the pages do not repeat each other. A sentence (or table cell, or list
    item) of 50 characters or more that two pages share is text that should live in one of them."""
    where: dict[str, set[str]] = defaultdict(set)
    for page in PAGES:
        text = re.sub(r"\s+", " ", re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL))
        for sentence in re.split(r"(?<=[.;:])\s+|\s*\|\s*|\s[-—]\s", text):
            if len(sentence.strip()) >= 50:
                where[sentence.strip()].add(str(page.relative_to(REPO)))
    repeated = {s: sorted(p) for s, p in where.items() if len(p) > 1}
    assert not repeated, f"said in more than one page: {repeated}"


def variables_the_code_reads() -> set[str]:
    """Environment variables read by the settings (shared/config.py), the processes and the command line."""
    sources = [*(REPO / "shared").rglob("*.py"), *(REPO / "workers").rglob("*.py"), *(REPO / "ingress").rglob("*.py"),
               REPO / "cli" / "main.py"]
    names: set[str] = set()
    for path in sources:
        text = path.read_text()
        names |= set(re.findall(r"\benv(?:iron)?\.get\(\s*\"([A-Z][A-Z0-9_]+)\"", text))
        names |= set(re.findall(r"_number\(env, \"([A-Z][A-Z0-9_]+)\"", text))
        names |= set(re.findall(r"^ENV_\w+ = \"([A-Z][A-Z0-9_]+)\"", text, re.M))
    wsgi = {"REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE", "CONTENT_LENGTH",
            "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL"}  # PEP 3333's environ keys, not variables
    return {n for n in names if not n.startswith(("HTTP_", "REMOTE_")) and n not in wsgi}


def test_every_environment_variable_the_code_reads_is_documented():
    names = variables_the_code_reads()
    assert {"DATABASE_URL", "SECRET_KEY", "SWEEP_SECONDS", "WORKER_HEARTBEAT_FILE", "BIND", "OPENAI_MODEL"} <= names
    configuration = (DOCS / "configuration.md").read_text()
    undocumented = sorted(n for n in names if f"`{n}`" not in configuration)
    assert not undocumented, f"not in docs/configuration.md: {undocumented}"
