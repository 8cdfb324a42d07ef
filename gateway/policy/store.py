"""The policy set in force, replaced atomically: build and validate a complete new set,
then swap one reference. A failed reload keeps the last good set and says why."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import PolicyLoadError, Problem
from gateway.policy.diff import PolicyDiff
from gateway.policy.engine import CompiledPolicySet, compile_policy_set
from gateway.policy.loader import ParseCache, load_policy_dir


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    version: str
    trigger: str
    duration_seconds: float
    diff: PolicyDiff = field(default_factory=PolicyDiff)
    problems: tuple[Problem, ...] = ()


class PolicyStore:
    """Holds the compiled policy set in force. Reads are a single attribute load."""

    def __init__(self, directory: Path, groups: Mapping[str, frozenset[str]]) -> None:
        self.directory = directory
        self.groups = groups
        self._current: CompiledPolicySet | None = None
        self.last_result: ReloadResult | None = None
        self._parsed = ParseCache()  # unchanged files are not parsed again

    @property
    def current(self) -> CompiledPolicySet:
        if self._current is None:
            raise RuntimeError("no policy set loaded yet")
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None

    def build(self) -> CompiledPolicySet:
        """Read, validate and compile the directory without touching what is in force."""
        return compile_policy_set(load_policy_dir(self.directory, self.groups, self._parsed))

    def swap(self, new: CompiledPolicySet, trigger: str, started: float) -> ReloadResult:
        old = self._current.source if self._current else None
        diff = PolicyDiff.between(old, new.source)
        self._current = new
        result = ReloadResult(True, new.version, trigger, time.perf_counter() - started, diff)
        self.last_result = result
        return result

    def reload(self, trigger: str = "manual") -> ReloadResult:
        started = time.perf_counter()
        try:
            new = self.build()
        except PolicyLoadError as exc:
            version = self._current.version if self._current else ""
            result = ReloadResult(
                False, version, trigger, time.perf_counter() - started, problems=exc.problems
            )
            self.last_result = result
            if self._current is None:
                raise
            return result
        if self._current is not None and new.version == self._current.version:
            result = ReloadResult(True, new.version, trigger, time.perf_counter() - started)
            self.last_result = result
            return result
        return self.swap(new, trigger, started)
