"""The README and docs/: every relative link and image path leads to a file, and every `#anchor` to a
heading of that file; the README stays a page read in ten minutes; the Postman environment points at the
address the README's run command serves on."""

import json
import re
from pathlib import Path

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(FENCE.sub("", page.read_text())) if "://" not in target]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_and_image_leads_somewhere(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and anchor not in anchors(linked)):
            broken.append(target)
    assert broken == []


def test_the_readme_is_read_in_ten_minutes():
    assert len((REPO / "README.md").read_text().splitlines()) < 250


def test_the_postman_environment_points_where_the_run_command_serves():
    readme = (REPO / "README.md").read_text()
    environment = json.loads((REPO / "postman" / "gainz.postman_environment.json").read_text())
    base_url = next(value["value"] for value in environment["values"] if value["key"] == "base_url")
    assert base_url == "http://127.0.0.1:8000"
    assert "on <http://127.0.0.1:8000>" in readme
