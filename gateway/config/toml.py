"""Strict reading of admin-edited TOML, with every problem located by file, line and key.

``tomllib`` parses but forgets where things were; admins need "policies/ban.toml:12:
policy[0].match.apps_anyy: unknown key". :func:`line_index` recovers key positions with a
light scan of the source, and :class:`Table` reads a parsed table field by field, collecting
problems instead of stopping at the first, and reporting keys nobody asked for.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import Problem

KeyPath = tuple[str | int, ...]
T = TypeVar("T")

_BARE_OR_QUOTED = r"(?:[A-Za-z0-9_-]+|\"(?:[^\"\\]|\\.)*\"|'[^']*')"
_DOTTED = rf"{_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*"
_HEADER_RE = re.compile(rf"^\s*(\[\[?)\s*({_DOTTED})\s*\]\]?\s*(?:#.*)?$")
_KEY_RE = re.compile(rf"^\s*({_DOTTED})\s*=")
_PART_RE = re.compile(_BARE_OR_QUOTED)

# Limits that keep a hostile or broken file from costing more than it is worth.
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_NESTING = 32
MAX_INTEGER = 2**63 - 1


def _split_dotted(text: str) -> list[str]:
    parts = []
    for raw in _PART_RE.findall(text):
        parts.append(raw[1:-1] if raw[0] in "\"'" else raw)
    return parts


def line_index(text: str) -> dict[KeyPath, int]:
    """Map key paths (tables, array-of-table indices, keys) to the line that defines them."""
    lines: dict[KeyPath, int] = {}
    array_counts: dict[KeyPath, int] = {}
    current: KeyPath = ()
    open_string: str | None = None

    def resolve(parts: list[str]) -> KeyPath:
        # [policy.match] refers to the latest [[policy]] element.
        path: KeyPath = ()
        for part in parts:
            path = (*path, part)
            if path in array_counts:
                path = (*path, array_counts[path])
        return path

    for number, line in enumerate(text.splitlines(), start=1):
        if open_string is not None:
            if line.count(open_string) % 2 == 1:
                open_string = None
            continue
        header = _HEADER_RE.match(line)
        if header:
            parts = _split_dotted(header.group(2))
            if header.group(1) == "[[":
                base = (*resolve(parts[:-1]), parts[-1])
                index = array_counts.get(base, -1) + 1
                array_counts[base] = index
                current = (*base, index)
                lines.setdefault(base, number)
            else:
                current = resolve(parts)
            lines.setdefault(current, number)
            continue
        key = _KEY_RE.match(line)
        if key:
            path = current + tuple(_split_dotted(key.group(1)))
            for end in range(len(current) + 1, len(path) + 1):
                lines.setdefault(path[:end], number)
            rest = line[key.end() :]
            for quote in ('"""', "'''"):
                if rest.count(quote) == 1:
                    open_string = quote
    return lines


def format_key(path: KeyPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


@dataclass
class TomlFile:
    """One parsed TOML file and the means to locate its keys."""

    path: Path
    text: str
    data: dict[str, Any]
    display_name: str
    _lines: dict[KeyPath, int] | None = field(default=None, repr=False)
    # Keys set from elsewhere (environment variables): key path -> where it came from.
    overrides: dict[KeyPath, str] = field(default_factory=dict)

    def line_of(self, path: KeyPath) -> int | None:
        if self._lines is None:
            self._lines = line_index(self.text)
        for end in range(len(path), 0, -1):
            found = self._lines.get(path[:end])
            if found is not None:
                return found
        return None

    def problem(self, path: KeyPath, message: str) -> Problem:
        for origin_path, origin in self.overrides.items():
            if path and (
                path[: len(origin_path)] == origin_path or origin_path[: len(path)] == path
            ):
                return Problem(origin, None, format_key(path), message)
        return Problem(self.display_name, self.line_of(path), format_key(path), message)


_TOML_LINE_RE = re.compile(r"\(at line (\d+), column \d+\)")


def _check_shape(value: object, depth: int = 0) -> str | None:
    """tomllib accepts what Python can hold; refuse what no admin means to write."""
    if depth > MAX_NESTING:
        return f"nesting deeper than {MAX_NESTING} levels"
    if isinstance(value, dict):
        for item in value.values():
            problem = _check_shape(item, depth + 1)
            if problem:
                return problem
    elif isinstance(value, list):
        for item in value:
            problem = _check_shape(item, depth + 1)
            if problem:
                return problem
    elif isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > MAX_INTEGER:
            return "an integer does not fit in 64 bits"
    elif isinstance(value, float) and math.isnan(value):
        return "NaN is not a valid value here"
    return None


def read_toml(path: Path, display_name: str | None = None) -> TomlFile | Problem:
    """Read and parse one file; any failure becomes a located Problem, never an exception."""
    name = display_name or str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return Problem(name, None, "", f"cannot read file: {exc.strerror or exc}")
    return parse_toml(raw, path, name)


def parse_toml(raw: bytes, path: Path, name: str) -> TomlFile | Problem:
    """Parse bytes already read from ``path``; any failure becomes a located Problem."""
    if len(raw) > MAX_FILE_BYTES:
        return Problem(name, None, "", f"file is larger than {MAX_FILE_BYTES} bytes")
    if raw.startswith(b"\xef\xbb\xbf"):
        return Problem(
            name, 1, "", "file starts with a byte-order mark; save it as UTF-8 without BOM"
        )
    if b"\x00" in raw:
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        return Problem(name, line, "", "file contains a NUL byte")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return Problem(name, line, "", "file is not valid UTF-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = _TOML_LINE_RE.search(message)
        error_line = int(found.group(1)) if found else None
        return Problem(
            name, error_line, "", f"TOML syntax: {_TOML_LINE_RE.sub('', message).strip()}"
        )
    except RecursionError:
        return Problem(name, None, "", f"nesting deeper than {MAX_NESTING} levels")
    except ValueError as exc:
        # tomllib lets int() errors through (e.g. a 5,000-digit integer).
        return Problem(name, None, "", f"a value cannot be read: {str(exc).split(';')[0]}")
    shape = _check_shape(data)
    if shape:
        return Problem(name, None, "", shape)
    return TomlFile(path=path, text=text, data=data, display_name=name)


_MISSING: Any = object()


class Table:
    """A strict, problem-collecting view of one TOML table.

    Each accessor returns the value or ``None`` (after recording a problem);
    :meth:`finish` records every key that no accessor asked for.
    """

    def __init__(
        self, source: TomlFile, data: dict[str, Any], path: KeyPath, problems: list[Problem]
    ) -> None:
        self.source = source
        self.data = data
        self.path = path
        self.problems = problems
        self._seen: set[str] = set()

    def problem(self, key: str | int | None, message: str) -> None:
        path = self.path if key is None else (*self.path, key)
        self.problems.append(self.source.problem(path, message))

    def has(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str, required: bool) -> Any:
        self._seen.add(key)
        if key not in self.data:
            if required:
                self.problem(None, f"missing required key '{key}'")
            return _MISSING
        return self.data[key]

    def _typed(self, key: str, required: bool, check: Callable[[Any], bool], expected: str) -> Any:
        value = self._get(key, required)
        if value is _MISSING:
            return None
        if not check(value):
            self.problem(key, f"expected {expected}, got {_describe(value)}")
            return None
        return value

    def text(self, key: str, *, required: bool = False) -> str | None:
        value: str | None = self._typed(key, required, lambda v: isinstance(v, str), "a string")
        return value

    def choice(
        self, key: str, choices: Iterator[str] | list[str], *, required: bool = False
    ) -> str | None:
        allowed = list(choices)
        value = self.text(key, required=required)
        if value is not None and value not in allowed:
            self.problem(key, f"'{value}' is not one of: {', '.join(allowed)}")
            return None
        return value

    def flag(self, key: str, *, required: bool = False) -> bool | None:
        value: bool | None = self._typed(
            key, required, lambda v: isinstance(v, bool), "true or false"
        )
        return value

    def integer(
        self, key: str, *, required: bool = False, minimum: int | None = None
    ) -> int | None:
        value: int | None = self._typed(
            key, required, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"
        )
        if value is not None and minimum is not None and value < minimum:
            self.problem(key, f"must be at least {minimum}, got {value}")
            return None
        return value

    def number(self, key: str, *, required: bool = False, minimum: float = 0.0) -> float | None:
        value = self._typed(
            key,
            required,
            lambda v: isinstance(v, int | float) and not isinstance(v, bool),
            "a number",
        )
        if value is None:
            return None
        if not math.isfinite(value) or value < minimum:
            self.problem(key, f"must be a finite number of at least {minimum}, got {value}")
            return None
        return float(value)

    def moment(self, key: str, *, required: bool = False) -> datetime | None:
        value = self._get(key, required)
        if value is _MISSING:
            return None
        if not isinstance(value, datetime):
            self.problem(
                key,
                f"expected a date-time with an offset (2020-07-10T09:00:00-07:00), got {_describe(value)}",
            )
            return None
        if value.tzinfo is None:
            self.problem(
                key,
                "date-time has no UTC offset; write it as "
                f"{value.isoformat()}Z or with an offset such as {value.isoformat()}-07:00",
            )
            return None
        return value

    def texts(
        self, key: str, *, required: bool = False, allow_empty: bool = False
    ) -> list[str] | None:
        value = self._get(key, required)
        if value is _MISSING:
            return None
        if not isinstance(value, list):
            self.problem(key, f"expected a list of strings, got {_describe(value)}")
            return None
        bad = [i for i, item in enumerate(value) if not isinstance(item, str)]
        for index in bad:
            self.problems.append(
                self.source.problem(
                    (*self.path, key, index), f"expected a string, got {_describe(value[index])}"
                )
            )
        if bad:
            return None
        if not value and not allow_empty:
            self.problem(
                key, "empty list matches nothing; remove the key or list at least one value"
            )
            return None
        return list(value)

    def table(self, key: str, *, required: bool = False) -> Table | None:
        value = self._get(key, required)
        if value is _MISSING:
            return None
        if not isinstance(value, dict):
            self.problem(key, f"expected a table, got {_describe(value)}")
            return None
        return Table(self.source, value, (*self.path, key), self.problems)

    def tables(self, key: str) -> list[Table]:
        value = self._get(key, False)
        if value is _MISSING:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.problem(key, f"expected [[{key}]] tables, got {_describe(value)}")
            return []
        return [
            Table(self.source, v, (*self.path, key, i), self.problems) for i, v in enumerate(value)
        ]

    def mapping(
        self, key: str, check: Callable[[Any], bool], expected: str
    ) -> dict[str, Any] | None:
        """A table whose keys are free-form names (groups, aliases, posture flags)."""
        sub = self.table(key)
        if sub is None:
            return None
        result: dict[str, Any] = {}
        for name, value in sub.data.items():
            sub._seen.add(name)
            if check(value):
                result[name] = value
            else:
                sub.problem(name, f"expected {expected}, got {_describe(value)}")
        return result

    def finish(self) -> None:
        """Report every key no accessor asked for, suggesting the nearest known one."""
        known = sorted(self._seen)
        for key in self.data:
            if key in self._seen:
                continue
            close = difflib.get_close_matches(key, known, n=1)
            if close:
                self.problem(key, f"unknown key (did you mean '{close[0]}'?)")
            else:
                self.problem(key, f"unknown key (allowed here: {', '.join(known)})")


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, datetime):
        return "a date-time"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__
