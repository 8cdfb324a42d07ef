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

import watchfiles

from gateway.errors import PolicyLoadError
from gateway.policy.loader import policy_files, policy_version
from gateway.policy.store import Guard, PolicyStore, ReloadResult


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
    ) -> None:
        self.store = store
        self.on_reloaded = on_reloaded
        self.guard = guard
        self._lock = asyncio.Lock()

    async def reload(self, trigger: str) -> ReloadResult:
        async with self._lock:
            started = time.perf_counter()
            before = self.store.current.version
            built = await asyncio.to_thread(self.store.try_build)
            result = self.store.apply(built, trigger, started, self.guard)
        if result.ok and result.version != before:  # a new set is in force
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
