"""Hot reload of the policy directory: file events, SIGHUP, and a periodic check.

We watch the directory, not the files: a Kubernetes ConfigMap update swaps the ``..data``
symlink, and editors save by writing a temporary file and renaming it; neither modifies
the original file. The periodic check hashes the raw bytes (cheap) and parses only when
they changed, so it also catches changes the watcher missed (network filesystems).

Reloads are serialised; parsing and compiling run in a worker thread so sessions keep
flowing; the swap itself happens on the event loop, so every message is decided against
exactly one policy set.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
import watchfiles

from gateway.errors import PolicyLoadError, Problem
from gateway.policy.engine import CompiledPolicySet
from gateway.policy.loader import policy_files, policy_version
from gateway.policy.store import PolicyStore, ReloadResult

log = structlog.get_logger("gateway.reload")

# Given (in force, candidate), a reason to refuse the candidate, or None to accept it.
Guard = Callable[[CompiledPolicySet, CompiledPolicySet], str | None]


def directory_fingerprint(store: PolicyStore) -> str | None:
    """The version the directory would have, from raw bytes, without parsing."""
    try:
        contents = [(p.name, p.read_bytes()) for p in policy_files(store.directory)]
    except (OSError, PolicyLoadError):
        return None
    groups = {
        name: frozenset(m.casefold() for m in members) for name, members in store.groups.items()
    }
    return policy_version(contents, groups)


class Reloader:
    def __init__(
        self,
        store: PolicyStore,
        on_reloaded: Callable[[ReloadResult], Awaitable[None]],
        guard: Guard | None = None,
    ) -> None:
        self.store = store
        self.on_reloaded = on_reloaded
        self.guard = guard
        self._lock = asyncio.Lock()
        self.reloads = 0
        self.failures = 0

    def _kept(
        self, trigger: str, started: float, problems: tuple[Problem, ...], event: str
    ) -> ReloadResult:
        """A reload that did not happen: the last good set stays, and the failure shows."""
        result = ReloadResult(
            False,
            self.store.current.version,
            trigger,
            time.perf_counter() - started,
            problems=problems,
        )
        self.store.last_result = result
        self.failures += 1
        log.error(
            event, trigger=trigger, kept_version=result.version, problems=[str(p) for p in problems]
        )
        return result

    async def reload(self, trigger: str) -> ReloadResult:
        async with self._lock:
            started = time.perf_counter()
            try:
                new = await asyncio.to_thread(self.store.build)
            except PolicyLoadError as exc:
                return self._kept(trigger, started, exc.problems, "policy_reload_failed")
            except Exception as exc:  # a reload must never take the server down
                log.exception("policy_reload_crashed", trigger=trigger, error=type(exc).__name__)
                problem = Problem(
                    str(self.store.directory), None, "", f"reload failed: {type(exc).__name__}"
                )
                return self._kept(trigger, started, (problem,), "policy_reload_failed")
            refusal = self.guard(self.store.current, new) if self.guard else None
            if refusal is not None:
                problem = Problem(str(self.store.directory), None, "confirm_impact", refusal)
                return self._kept(trigger, started, (problem,), "policy_reload_refused")
            if new.version == self.store.current.version:
                return ReloadResult(True, new.version, trigger, time.perf_counter() - started)
            result = self.store.swap(new, trigger, started)
            self.reloads += 1
            log.info(
                "policy_reload",
                trigger=trigger,
                version=result.version,
                added=list(result.diff.added),
                changed=list(result.diff.changed),
                retracted=list(result.diff.retracted),
                removed=list(result.diff.removed),
                seconds=round(result.duration_seconds, 4),
            )
        await self.on_reloaded(result)
        return result

    async def watch(self, stop: asyncio.Event) -> None:
        directory: Path = self.store.directory
        async for _changes in watchfiles.awatch(
            directory, stop_event=stop, debounce=200, step=50, recursive=True
        ):
            await self.reload("watch")

    async def poll(self, interval: float, stop: asyncio.Event) -> None:
        """Compare raw bytes with the version in force; the first check comes after 1 s,
        covering edits made between start-up and the watcher being armed."""
        wait = min(interval, 1.0)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=wait)
            except TimeoutError:
                fingerprint = await asyncio.to_thread(directory_fingerprint, self.store)
                if fingerprint is not None and fingerprint != self.store.current.version:
                    await self.reload("periodic")
            wait = interval
