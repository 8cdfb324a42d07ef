"""The device inventory: the last claims each device presented, kept for the impact
preview and the reload guard (docs/lifecycle.md says what it keeps and for how long).

Kept in memory for the guard, and written to the store in batches on the release tick:
a device that authenticates 100 times in 5 s is written once, and one that comes back
with the same claims is written again only after :data:`REWRITE_AFTER` (its last-seen
time in the store lags by at most that; retention is counted in days). Losing a batch in
a crash is harmless; the inventory is a cache of what devices say about themselves.
"""

from __future__ import annotations

from datetime import timedelta

from gateway.domain import Access, Clock, DeviceClaims
from gateway.hold.store import AsyncStore

# A phone reconnects for every message: rewriting each device at every tick made the
# tick's store work grow with the fleet (5,000 devices: the SMTP p99 tripled at each
# tick, docs/performance.md). Unchanged claims are rewritten this often at most.
REWRITE_AFTER = timedelta(minutes=1)


class Inventory:
    def __init__(self, store: AsyncStore, retention: timedelta, clock: Clock) -> None:
        self.store = store
        self.retention = retention
        self.clock = clock
        self._devices: dict[str, DeviceClaims] = {}  # recently seen, by device id
        self._accesses: dict[str, set[Access]] = {}  # what each of them used
        # Seen since the last flush, by device and access.
        self._pending: dict[tuple[str, Access], tuple[DeviceClaims, float, Access]] = {}
        # Written by the last flushes (less than REWRITE_AFTER ago): the claims and when.
        self._written: dict[tuple[str, Access], tuple[DeviceClaims, float]] = {}

    async def load(self) -> None:
        """Start from what the store remembers of the retention period."""
        since = self.clock() - self.retention
        for claims in await self.store.devices(since):
            self._devices[claims.device.id] = claims
        for device_id, accesses in (await self.store.device_accesses(since)).items():
            self._accesses[device_id] = set(accesses)

    def seen(self, claims: DeviceClaims, access: Access = Access.SEND) -> None:
        """A device authenticated to send (SMTP AUTH) or logged in to sync (IMAP, POP3)."""
        device_id = claims.device.id
        self._devices[device_id] = claims
        self._accesses.setdefault(device_id, set()).add(access)
        now = self.clock().timestamp()
        written = self._written.get((device_id, access))
        if (
            written is not None
            and written[0] == claims
            and now - written[1] < REWRITE_AFTER.total_seconds()
        ):
            return  # in the store already, with these claims, seen moments ago
        self._pending[device_id, access] = (claims, now, access)

    def devices(self) -> list[DeviceClaims]:
        return list(self._devices.values())

    def accesses_of(self, claims: DeviceClaims) -> frozenset[Access]:
        """What this device was seen doing: so that the impact of a policy narrowed to
        syncing counts the phones that only sync, and no laptop that only sends."""
        return frozenset(self._accesses.get(claims.device.id) or Access)

    async def flush(self) -> None:
        """Write what was seen since the last flush, and forget devices past retention."""
        pending, self._pending = list(self._pending.values()), {}
        await self.store.record_devices(pending)
        for claims, at, access in pending:
            self._written[claims.device.id, access] = (claims, at)
        stale = self.clock().timestamp() - REWRITE_AFTER.total_seconds()
        if len(self._written) > 2 * len(pending):  # bounded by the devices of the last minute
            self._written = {k: v for k, v in self._written.items() if v[1] >= stale}
        await self.store.prune_devices(self.clock() - self.retention)
