"""Mail-server configuration in the docs is the shipped, tested configuration.

A fenced block whose first line is ``# deploy/<path>`` (or ``# deploy/<path> (excerpt)``)
must be that file, or a run of consecutive lines of it. deploy/dovecot/ and deploy/nginx/
are the files the real-server tests start Dovecot and nginx from
(tests/sync/test_real_dovecot.py), so a snippet cannot drift from what was tested.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```$", re.MULTILINE | re.DOTALL)
SOURCE = re.compile(r"# (deploy/[A-Za-z0-9_./-]+)( \(excerpt\))?$")


def snippets() -> list[tuple[str, str, bool, list[str]]]:
    """(document, shipped path, excerpt?, lines) for each block naming a deploy file."""
    found = []
    for document in DOCUMENTS:
        for block in FENCE.findall(document.read_text(encoding="utf-8")):
            first, *lines = block.rstrip("\n").split("\n")
            match = SOURCE.fullmatch(first)
            if match:
                found.append((document.name, match[1], bool(match[2]), lines))
    return found


def test_config_excerpts_in_the_docs_are_the_shipped_files() -> None:
    found = snippets()
    named = {path for _, path, _, _ in found}
    assert {
        "deploy/dovecot/dovecot.conf",
        "deploy/dovecot/oauth2-refusal.conf.ext",
        "deploy/dovecot/oauth2-introspect.conf.ext",
        "deploy/nginx/nginx-mail.conf",
    } <= named
    for document, path, excerpt, lines in found:
        shipped = (REPO / path).read_text(encoding="utf-8").rstrip("\n").split("\n")
        if not excerpt:
            assert lines == shipped, f"{document}: the block is not all of {path}"
            continue
        runs = (
            shipped[start : start + len(lines)] for start in range(len(shipped) - len(lines) + 1)
        )
        assert lines in runs, f"{document}: a block is no run of lines of {path}:\n" + "\n".join(
            lines
        )


def test_a_changed_line_is_noticed() -> None:
    """The check above can fail: an excerpt with one line changed is no run of the file."""
    (path_doc, path, _, lines) = next(s for s in snippets() if s[1].endswith("dovecot.conf"))
    shipped = (REPO / path).read_text(encoding="utf-8").split("\n")
    changed = [*lines[:-1], lines[-1] + " # changed"]
    runs = [shipped[i : i + len(changed)] for i in range(len(shipped) - len(changed) + 1)]
    assert changed not in runs
    assert lines in runs, path_doc
