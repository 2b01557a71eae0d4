"""The project's Markdown pages link to files and sections that exist.

Links are checked the way GitHub renders them: a relative path from the page's folder, and an
anchor that is the slug of one of the target page's headings (lower case, punctuation other than
hyphens dropped, spaces as hyphens, "-1", "-2" ... after repeated headings).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (fenced code blocks skipped)."""
    found, seen, in_code = set(), {}, False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"#{1,6} (.*)", line)
        if heading:
            slug = heading_slug(heading.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def local_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(page.read_text(encoding="utf-8"))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_heading_slugs_follow_github():
    assert heading_slug("Relations stated in reading order (2026-11-29, stop 38; shipped in stop 39)") == \
        "relations-stated-in-reading-order-2026-11-29-stop-38-shipped-in-stop-39"
    assert heading_slug("The model's own images wrong in one fact: the checker's mirror") == \
        "the-models-own-images-wrong-in-one-fact-the-checkers-mirror"
    assert heading_slug("Results") == "results"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_local_link_resolves(page):
    broken = [f"{target}...: the link's target is cut by a line break"
              for target in re.findall(r"\]\(([^)\s]*)\n", page.read_text(encoding="utf-8"))]
    for target in local_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)
