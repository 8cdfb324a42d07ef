"""The device inventory: the last claims each device presented, kept for the impact
preview and the reload guard (docs/lifecycle.md says what it keeps and for how long).

Kept in memory for the guard, and written to the store in batches on the release tick:
a device that authenticates 100 times in 5 s is written once. Losing a batch in a crash
is harmless; the inventory is a cache of what devices say about themselves.
"""

from __future__ import annotations

from datetime import timedelta

from gateway.domain import Access, Clock, DeviceClaims
from gateway.hold.store import AsyncStore


class Inventory:
    def __init__(self, store: AsyncStore, retention: timedelta, clock: Clock) -> None:
        self.store = store
        self.retention = retention
        self.clock = clock
        self._devices: dict[str, DeviceClaims] = {}  # recently seen, by device id
        self._accesses: dict[str, set[Access]] = {}  # what each of them used
        # Seen since the last flush, by device and access.
        self._pending: dict[tuple[str, Access], tuple[DeviceClaims, float, Access]] = {}

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
        self._pending[device_id, access] = (claims, self.clock().timestamp(), access)

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
        await self.store.prune_devices(self.clock() - self.retention)
