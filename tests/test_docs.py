"""Every doc the code, the tests and the README cite is a file under docs/, and every cited section exists."""

from __future__ import annotations

import re
from pathlib import Path

from .conftest import REPO

CITATION = re.compile(r"docs/([\w-]+\.md)((?:#[\w-]+)?)((?:, #[\w-]+)*)")
SOURCES = [*sorted((REPO / "istr").rglob("*.py")), *sorted((REPO / "analysis").rglob("*.py")),
           *sorted((REPO / "tests").rglob("*.py")), *sorted((REPO / "docs").glob("*.md")), REPO / "README.md",
           *sorted((REPO / "experiments").glob("*.yaml"))]  # fmt: skip


def anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces -> '-'."""
    headings = re.findall(r"^#+ (.+)$", doc.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


def citations(path: Path) -> list[tuple[str, str]]:
    """(doc file, anchor or '') for every ``docs/<file>.md[#anchor][, #anchor]`` in ``path``."""
    found = []
    for doc, first, more in CITATION.findall(path.read_text()):
        found += [(doc, a) for a in [first, *re.findall(r"#[\w-]+", more)]]
    return found


def test_cited_docs_and_sections_exist():
    missing = []
    for path in SOURCES:
        for doc, anchor in citations(path):
            target = REPO / "docs" / doc
            if not target.is_file() or (anchor and anchor[1:] not in anchors(target)):
                missing.append(f"{path.relative_to(REPO)} cites docs/{doc}{anchor}")
    assert not missing, "\n".join(missing)


# The reference notes outside the repo, spelled in pieces so this file does not match itself.
OUTSIDE = re.compile("|".join(["ISTR" + "_SPEC", "DESIGN" + r"\.md", "shared" + "/docs"]))


def test_nothing_points_outside_the_repo():
    outside = [str(p.relative_to(REPO)) for p in SOURCES if OUTSIDE.search(p.read_text())]
    assert not outside, outside


def test_the_checker_reads_anchors_and_section_lists(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text("# Title\n## Matching cost\n## Data flow: what runs\n")
    assert anchors(doc) == {"title", "matching-cost", "data-flow-what-runs"}
    source = tmp_path / "s.py"
    source.write_text('"""See docs/method.md#loss, #training and docs/architecture.md."""\n')
    assert citations(source) == [("method.md", "#loss"), ("method.md", "#training"), ("architecture.md", "")]
