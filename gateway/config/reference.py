"""The configuration reference (Markdown), generated from the settings declarations.

docs/configuration.md holds it between two markers; the prose around them is written by
hand. Every key comes from a field's ``setting(...)`` metadata in gateway/config/settings.py,
its default from the field's default, so the reference cannot drift from the reader.

    python -m gateway.config.reference                                  # print the block
    python -m gateway.config.reference --write docs/configuration.md    # rewrite the block
    python -m gateway.config.reference --check docs/configuration.md    # exit 1 if stale
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.config.settings import SECTIONS, Key, MailLists, Section, documented_keys

BEGIN = "<!-- BEGIN GENERATED REFERENCE -->"
END = "<!-- END GENERATED REFERENCE -->"
DEFAULT_DOCUMENT = Path("docs/configuration.md")
WRITE_COMMAND = f"python -m gateway.config.reference --write {DEFAULT_DOCUMENT}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def key_cell(key: Key) -> str:
    """The key as written in the file; a placeholder where the admin picks the name."""
    if isinstance(key.setting.kind, MailLists):
        return f"`{key.setting.kind.placeholder}`"
    return f"`{key.name}`"


def default_toml(key: Key) -> str | None:
    """The default as an admin writes it (TOML), or None when only absence says it."""
    if key.required:
        return None
    return key.setting.kind.show(key.default)


def default_cell(key: Key) -> str:
    if key.required:
        return "required"
    shown = default_toml(key)
    if shown is not None:
        return f"`{shown}`"
    return f"not set: {key.setting.unset}" if key.setting.unset else "not set"


def _header(section: Section) -> str:
    return f"[[{section.name}]]" if section.array else f"[{section.name}]"


def render_section(section: Section, keys: Sequence[Key]) -> list[str]:
    lines = [f"### `{_header(section)}`", "", section.doc, ""]
    lines += ["| Key | Type | Default | Meaning |", "| --- | --- | --- | --- |"]
    for key in keys:
        cells = (
            key_cell(key),
            key.setting.kind.written(),
            default_cell(key),
            key.setting.doc,
        )
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return [*lines, ""]


def generate() -> str:
    """The whole block, markers included, ending with a newline."""
    keys = documented_keys()
    lines = [
        BEGIN,
        "<!-- Generated from gateway/config/settings.py; edit the settings there, then run:",
        f"     {WRITE_COMMAND} -->",
        "",
    ]
    for section in SECTIONS:
        lines += render_section(section, [k for k in keys if k.section == section])
    return "\n".join([*lines, END]) + "\n"


class MarkersMissing(ValueError):
    pass


def current_block(document: str) -> str:
    """The block as it stands in ``document``, markers included."""
    start, end = document.find(BEGIN), document.find(END)
    if start < 0 or end < start:
        raise MarkersMissing(f"no {BEGIN} ... {END} block")
    return document[start : end + len(END)] + "\n"


def replace_block(document: str, block: str) -> str:
    old = current_block(document)
    start = document.index(BEGIN)
    rest = document[start + len(old) :]
    return document[:start] + block + rest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.config.reference",
        description="Print, write or check the generated gateway.toml reference.",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--write",
        metavar="DOCUMENT",
        nargs="?",
        const=DEFAULT_DOCUMENT,
        type=Path,
        help=f"replace the generated block in DOCUMENT (default {DEFAULT_DOCUMENT})",
    )
    action.add_argument(
        "--check",
        metavar="DOCUMENT",
        nargs="?",
        const=DEFAULT_DOCUMENT,
        type=Path,
        help=f"exit 1 if the block in DOCUMENT (default {DEFAULT_DOCUMENT}) is out of date",
    )
    args = parser.parse_args(argv)
    block = generate()
    document_path: Path | None = args.write or args.check
    if document_path is None:
        sys.stdout.write(block)
        return 0
    try:
        document = document_path.read_text(encoding="utf-8")
        stale = current_block(document) != block
    except (OSError, MarkersMissing) as exc:
        print(f"{document_path}: {exc}", file=sys.stderr)
        return 2
    if args.check is not None:
        if stale:
            print(
                f"{document_path}: the configuration reference is out of date; "
                f"run: python -m gateway.config.reference --write {document_path}",
                file=sys.stderr,
            )
            return 1
        return 0
    if stale:
        document_path.write_text(replace_block(document, block), encoding="utf-8")
        print(f"{document_path}: reference rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
