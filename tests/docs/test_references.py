"""Every promise in the docs names the test that checks it; these names must stay true.

A test file moved or a test renamed without updating the README or docs/ would leave a
promise pointing at nothing. The CHANGELOG is history and may name old paths.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PATH_REFERENCE = re.compile(r"tests/[A-Za-z0-9_/]+\.py(?:::[A-Za-z0-9_]+)?")
NAME_REFERENCE = re.compile(r"`(test_[a-z0-9_]+\.py)`")


def references() -> list[tuple[str, str]]:
    found = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        found += [(document.name, match) for match in PATH_REFERENCE.findall(text)]
        found += [(document.name, match) for match in NAME_REFERENCE.findall(text)]
    return sorted(set(found))


def test_the_docs_name_tests_at_all() -> None:
    assert len(references()) > 20


@pytest.mark.parametrize(("document", "reference"), references())
def test_each_named_test_exists(document: str, reference: str) -> None:
    path, _, function = reference.partition("::")
    if "/" in path:
        assert (REPO / path).is_file(), f"{document} names {path}, which does not exist"
        files = [REPO / path]
    else:
        files = list((REPO / "tests").rglob(path))
        assert files, f"{document} names {path}, which is no file under tests/"
    if function:
        defined = re.compile(rf"^(?:async )?def {re.escape(function)}\(", re.MULTILINE)
        assert any(defined.search(f.read_text(encoding="utf-8")) for f in files), (
            f"{document} names {reference}, but {path} defines no {function}"
        )
