"""OS versions compared as versions, not strings: "13.10" > "13.5.1"."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

Version = tuple[int, ...]

_VERSION_RE = re.compile(r"^\s*v?(\d{1,9}(?:\.\d{1,9}){0,5})")
_CLAUSE_RE = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*$")
_OPERATORS: dict[str, Callable[[Version, Version], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}


def parse_version(text: str) -> Version | None:
    """The leading numeric part of a version ("17.2.1 (21C66)" -> (17, 2, 1)), or None.

    Trailing zeros are dropped so that "17" == "17.0" == "17.0.0".
    """
    found = _VERSION_RE.match(text)
    if not found:
        return None
    parts = [int(p) for p in found.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


@dataclass(frozen=True)
class VersionRange:
    """A conjunction of comparisons, written like ">=13.0, <17.2"."""

    clauses: tuple[tuple[str, Version], ...]
    text: str

    def contains(self, version: Version) -> bool:
        return all(compare(version, bound) for compare, bound in self.compiled)

    @cached_property
    def compiled(self) -> tuple[tuple[Callable[[Version, Version], bool], Version], ...]:
        return tuple((_OPERATORS[op], bound) for op, bound in self.clauses)

    def is_empty(self) -> bool:
        """True when no version can satisfy every clause (">=15, <14")."""
        lower: tuple[Version, bool] | None = None  # (bound, inclusive)
        upper: tuple[Version, bool] | None = None
        equal: list[Version] = []
        for op, bound in self.clauses:
            if op in (">", ">="):
                candidate = (bound, op == ">=")
                if (
                    lower is None
                    or candidate[0] > lower[0]
                    or (candidate[0] == lower[0] and not candidate[1])
                ):
                    lower = candidate
            elif op in ("<", "<="):
                candidate = (bound, op == "<=")
                if (
                    upper is None
                    or candidate[0] < upper[0]
                    or (candidate[0] == upper[0] and not candidate[1])
                ):
                    upper = candidate
            elif op == "==":
                equal.append(bound)
        if equal:
            return not all(self.contains(v) for v in equal[:1]) or len(set(equal)) > 1
        if lower and upper:
            if lower[0] > upper[0]:
                return True
            if lower[0] == upper[0] and not (lower[1] and upper[1]):
                return True
        return False


def parse_range(text: str) -> VersionRange:
    """Parse ">=13.0, <17.2"; raises ValueError with a message an admin can act on."""
    clauses = []
    for raw in text.split(","):
        found = _CLAUSE_RE.match(raw)
        if not found:
            raise ValueError(f"'{raw.strip()}' is not a comparison; write e.g. \">=13.0, <17.2\"")
        version = parse_version(found.group(2))
        if version is None or not re.fullmatch(r"\d+(\.\d+)*", found.group(2)):
            raise ValueError(f"'{found.group(2)}' is not a version such as 17.2.1")
        clauses.append((found.group(1), version))
    return VersionRange(tuple(clauses), text)
