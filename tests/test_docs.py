"""Docs that can drift from the code are checked against it."""

import re
from pathlib import Path

from orchestrator.spec import reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_spec_reference_is_current():
    text = (ROOT / "docs" / "spec.md").read_text()
    assert reference_markdown().strip() in text, "docs/spec.md is stale: regenerate its tables with " \
                                                 "`longtail spec-reference`"


def test_markdown_links_resolve():
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", md.read_text()):
            if "://" in target:
                continue
            assert (md.parent / target).exists(), f"{md.name} links to missing {target}"


def test_readme_shows_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text
