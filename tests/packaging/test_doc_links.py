"""Every relative link in the repository's Markdown documents resolves to a file inside the repository
(a reader of a clone has nothing outside it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DOCUMENTS = sorted(path.relative_to(REPO) for path in REPO.rglob("*.md")
                   if not any(part.startswith(".") for part in path.relative_to(REPO).parts))


def test_the_main_documents_are_checked():
    assert {Path("README.md"), Path("BENCHMARKS.md"), Path("docs/ARCHITECTURE.md")} <= set(DOCUMENTS)


@pytest.mark.parametrize("document", DOCUMENTS, ids=str)
def test_relative_links_resolve_inside_the_repository(document):
    for target in LINK.findall((REPO / document).read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor in the same page
        resolved = (REPO / document).parent.joinpath(target.split("#")[0]).resolve()
        assert resolved.is_relative_to(REPO), f"{document}: {target} points outside the repository"
        assert resolved.exists(), f"{document}: {target} does not exist"
