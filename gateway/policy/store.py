"""The policy set in force, replaced atomically: build and validate a complete new set,
then swap one reference. A failed reload keeps the last good set and says why.

There is one reload path, :meth:`PolicyStore.apply`: every trigger (start-up, file events,
SIGHUP, the periodic check) builds a candidate (``try_build``, safe in a worker thread)
and hands it to ``apply`` (on the event loop), which computes the :class:`PolicyDiff`
once, asks the guard, and swaps.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from gateway.domain import NO_OVERRIDES, Overrides
from gateway.errors import PolicyLoadError, Problem
from gateway.policy.diff import PolicyDiff
from gateway.policy.engine import CompiledPolicySet, compile_policy_set
from gateway.policy.loader import ParseCache, ParsedFile, load_policy_dir, parse_policy_file

log = structlog.get_logger("gateway.reload")

# From this many policies in force, a changed file is parsed in a worker process: parsing a
# thousand policies holds the interpreter for about 0.2 s, during which the event loop
# serving SMTP would wait (docs/performance.md). Smaller sets parse in place, with no
# process to start.
PARSE_IN_PROCESS_FROM = 10_000

# Given (in force, candidate, what changed), a reason to refuse the candidate, or None.
Guard = Callable[[CompiledPolicySet, CompiledPolicySet, PolicyDiff], str | None]


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
        # Operator overrides in force (suspensions, break-glass exemptions), read from the
        # hold store by the services and given to every decision with the set in force.
        self.overrides: Overrides = NO_OVERRIDES
        self.last_result: ReloadResult | None = None
        self.last_failure: ReloadResult | None = None  # the last reload that failed, if any
        self._parsed = ParseCache(self._parse)  # unchanged files are not parsed again
        self._pool: ProcessPoolExecutor | None = None
        # (in force, candidate, diff) computed by try_build off the event loop, for apply
        self._diff: tuple[CompiledPolicySet, CompiledPolicySet, PolicyDiff] | None = None

    @property
    def current(self) -> CompiledPolicySet:
        if self._current is None:
            raise RuntimeError("no policy set loaded yet")
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None

    def _parse(
        self, raw: bytes, path: Path, name: str, groups: Mapping[str, frozenset[str]]
    ) -> ParsedFile:
        """Parse one changed file; for a large set in force, in a worker process (only the
        file's policies come back, a few ms to unpickle), else here."""
        current = self._current
        if current is None or len(current.source.policies) < PARSE_IN_PROCESS_FROM:
            return parse_policy_file(raw, path, name, groups)
        try:
            if self._pool is None:
                # spawn, not fork: the serving process has threads and an event loop
                context = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(max_workers=1, mp_context=context)
            return self._pool.submit(parse_policy_file, raw, path, name, dict(groups)).result()
        except Exception as exc:  # a broken pool must not break reloads: parse here
            log.warning("policy_parse_process_failed", error=type(exc).__name__)
            self.close()
            return parse_policy_file(raw, path, name, groups)

    def close(self) -> None:
        """Stop the parsing process, if one was started."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def build(self, previous: CompiledPolicySet | None = None) -> CompiledPolicySet:
        """Read, validate and compile the directory without touching what is in force;
        policies of files unchanged since ``previous`` are not compiled again."""
        return compile_policy_set(
            load_policy_dir(self.directory, self.groups, self._parsed), previous
        )

    def try_build(self) -> CompiledPolicySet | tuple[Problem, ...]:
        """:meth:`build`, with any failure turned into problems (a reload must never take
        the server down). Safe to run in a worker thread; it also computes the diff against
        the set in force there, so that :meth:`apply` on the event loop need not."""
        base = self._current
        try:
            built = self.build(base)
            if base is not None and built.version != base.version:
                self._diff = (base, built, PolicyDiff.between(base.source, built.source))
            return built
        except PolicyLoadError as exc:
            return exc.problems
        except Exception as exc:
            log.exception("policy_reload_crashed", error=type(exc).__name__)
            return (Problem(str(self.directory), None, "", f"reload failed: {type(exc).__name__}"),)

    def apply(
        self,
        built: CompiledPolicySet | tuple[Problem, ...],
        trigger: str,
        started: float,
        guard: Guard | None = None,
    ) -> ReloadResult:
        """Swap ``built`` in, or keep the last good set and record why not."""
        if isinstance(built, tuple):
            return self._kept(trigger, started, built, "policy_reload_failed")
        old = self._current
        if old is not None and built.version == old.version:
            return self._record(ReloadResult(True, built.version, trigger, _since(started)))
        diff = self._diff_of(old, built)
        refusal = guard(old, built, diff) if guard is not None and old is not None else None
        if refusal is not None:
            problem = Problem(str(self.directory), None, "confirm_impact", refusal)
            return self._kept(trigger, started, (problem,), "policy_reload_refused")
        self._current = built
        result = self._record(ReloadResult(True, built.version, trigger, _since(started), diff))
        log.info(
            "policy_reload",
            trigger=trigger,
            version=result.version,
            added=list(diff.added),
            changed=list(diff.changed),
            retracted=list(diff.retracted),
            removed=list(diff.removed),
            seconds=round(result.duration_seconds, 4),
        )
        return result

    def reload(self, trigger: str = "manual", guard: Guard | None = None) -> ReloadResult:
        """Build and apply in one synchronous step (start-up, tools, benchmarks). Raises
        PolicyLoadError when there is no good set at all, so nothing serves without one."""
        started = time.perf_counter()
        built = self.try_build()
        if isinstance(built, tuple) and self._current is None:
            self._record(ReloadResult(False, "", trigger, _since(started), problems=built))
            raise PolicyLoadError(list(built))
        return self.apply(built, trigger, started, guard)

    def _diff_of(self, old: CompiledPolicySet | None, built: CompiledPolicySet) -> PolicyDiff:
        cached, self._diff = self._diff, None
        if cached is not None and cached[0] is old and cached[1] is built:
            return cached[2]
        return PolicyDiff.between(old.source if old else None, built.source)

    def _kept(
        self, trigger: str, started: float, problems: tuple[Problem, ...], event: str
    ) -> ReloadResult:
        """A reload that did not happen: the last good set stays, and the failure shows."""
        version = self._current.version if self._current else ""
        result = self._record(
            ReloadResult(False, version, trigger, _since(started), problems=problems)
        )
        log.error(event, trigger=trigger, kept_version=version, problems=[str(p) for p in problems])
        return result

    def _record(self, result: ReloadResult) -> ReloadResult:
        self.last_result = result
        if not result.ok:
            self.last_failure = result
        return result


def _since(started: float) -> float:
    return time.perf_counter() - started
