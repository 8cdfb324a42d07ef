"""Hot reload of the policy directory: file events, SIGHUP, and a periodic check.

We watch the directory, not the files: a Kubernetes ConfigMap update swaps the ``..data``
symlink, and editors save by writing a temporary file and renaming it; neither modifies
the original file. The periodic check hashes the raw bytes (cheap) and parses only when
they changed, so it also catches changes the watcher missed (network filesystems).

Reloads are serialised; parsing and compiling run in a worker thread so sessions keep
flowing; the swap itself happens on the event loop, so every message is decided against
exactly one policy set.

A file is read only when it is complete. A tool that writes a file in parts leaves a
valid-looking first half on disk for a moment (a ban without the ``scope`` line that
narrows it, say), so a change seen by the watcher or the periodic check is applied only
once the directory has been quiet for ``settle`` seconds and two reads of its bytes agree,
and only if what was parsed is what was read. SIGHUP and start-up apply at once (the admin
says the edit is done). Editors and tools should still write by rename (docs/policies.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import structlog
import watchfiles

from gateway.errors import PolicyLoadError
from gateway.policy.loader import policy_files, policy_version
from gateway.policy.store import Guard, PolicyStore, ReloadResult

log = structlog.get_logger("gateway.reload")

DEFAULT_SETTLE_SECONDS = 2.0  # quiet time before a changed directory is read for real
MAX_SETTLE_ROUNDS = 30  # changing reads in a row before a trigger gives up


# How long the reload's worker thread may hold the interpreter while the event loop waits
# for it (CPython's default: 5 ms, each time the loop lets go of it for I/O).
RELOAD_SWITCH_INTERVAL = 0.0002


@contextlib.contextmanager
def serving_first() -> Iterator[None]:
    """While a reload builds in its worker thread, hand the interpreter back to the event
    loop within RELOAD_SWITCH_INTERVAL. Under CPython's default the loop waits up to 5 ms
    each time it has done I/O, which stretched SMTP's p99 to 15x its idle value during a
    100,000-policy reload (docs/performance.md); reloads are serialised, so this is the
    only place that changes the interval, and it puts it back."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, RELOAD_SWITCH_INTERVAL))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


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
    """The triggers of a reload; what a reload does is :meth:`PolicyStore.apply`."""

    def __init__(
        self,
        store: PolicyStore,
        on_reloaded: Callable[[ReloadResult], Awaitable[None]],
        guard: Guard | None = None,
        settle: float = DEFAULT_SETTLE_SECONDS,
        before_guard: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.on_reloaded = on_reloaded
        self.guard = guard
        # Brings what the guard counts up to date first (a worker reads the devices the
        # other workers have seen).
        self.before_guard = before_guard
        self.settle = settle
        self._lock = asyncio.Lock()

    @property
    def _last_ok(self) -> bool:
        last = self.store.last_result
        return last is None or last.ok

    async def reload(self, trigger: str) -> ReloadResult:
        """Build and apply now (start-up is the store's; this is SIGHUP's and tests')."""
        result = await self._reload(trigger, settled=None)
        assert result is not None  # only a settled reload can find the bytes changed
        return result

    async def _reload(self, trigger: str, settled: str | None) -> ReloadResult | None:
        """Build and apply; with ``settled`` (the directory's fingerprint after it settled),
        only if the files parsed are still those bytes (None: they changed meanwhile)."""
        async with self._lock:
            started = time.perf_counter()
            before = self.store.current.version
            with serving_first():
                built = await asyncio.to_thread(self.store.try_build)
            if settled is not None and not isinstance(built, tuple) and built.version != settled:
                log.info("policy_change_still_being_written", trigger=trigger)
                return None
            if self.guard is not None and self.before_guard is not None:
                await self.before_guard()
            result = self.store.apply(built, trigger, started, self.guard)
        if result.ok and result.version != before:  # a new set is in force
            await self.on_reloaded(result)
        return result

    async def reload_when_settled(self, trigger: str) -> ReloadResult | None:
        """Reload once the directory has been quiet for ``settle`` seconds and two reads
        agree. Gives up (None) after MAX_SETTLE_ROUNDS changing reads: the next file event
        or periodic check tries again, and nothing half-written is ever applied."""
        first = await asyncio.to_thread(directory_fingerprint, self.store)
        for _ in range(MAX_SETTLE_ROUNDS):
            await asyncio.sleep(self.settle)
            second = await asyncio.to_thread(directory_fingerprint, self.store)
            if first == second:
                if second == self.store.current.version and self._last_ok:
                    return None  # back to what is in force: nothing to do
                # (after a failed reload, a revert to the set in force is a good load:
                # recorded as one, so the failure stops showing)
                return await self._reload(trigger, settled=second)
            first = second
        log.warning("policy_directory_keeps_changing", trigger=trigger, settle=self.settle)
        return None

    async def watch(self, stop: asyncio.Event) -> None:
        directory: Path = self.store.directory
        async for _changes in watchfiles.awatch(
            directory, stop_event=stop, debounce=200, step=50, recursive=True
        ):
            await self.reload_when_settled("watch")

    async def poll(self, interval: float, stop: asyncio.Event) -> None:
        """Compare raw bytes with the version in force; the first check comes after 1 s,
        covering edits made between start-up and the watcher being armed."""
        wait = min(interval, 1.0)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=wait)
            except TimeoutError:
                fingerprint = await asyncio.to_thread(directory_fingerprint, self.store)
                if fingerprint is not None and (
                    fingerprint != self.store.current.version or not self._last_ok
                ):
                    await self.reload_when_settled("periodic")
            wait = interval
